/* Compiles kernels/*.cu as plain C++ for the host, so CI can run the real kernel code on the
 * CPU. The kernels use no shared memory and no synchronisation, and every thread works on its
 * own elements through a grid-stride loop, so running threads one after another is exact.
 * Used by tests/cuda_host.py: g++ -x c++ -include tests/cuda_host_shim.h kernels/X.cu */
#include <cstdint>
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct cuda_dim3 { unsigned int x, y, z; };
extern "C" { cuda_dim3 blockIdx, threadIdx, blockDim, gridDim; }
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
static inline uchar4 make_uchar4(unsigned char a, unsigned char b, unsigned char c, unsigned char d) {
    uchar4 r = {a, b, c, d};
    return r;
}
