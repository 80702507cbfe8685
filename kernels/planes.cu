// Plane transforms on the GPU: byte-identical to mithril_gpu/transforms.py and delta.py (FORMAT.md
// "Transforms" and "Deltas"). Loaded with cupy.RawModule (NVRTC): no host headers, extern "C" names.
//
// Layout: a tensor of n elements becomes planes laid out back to back in one buffer, plane k
// starting at out + k * stride (stride >= n; every plane here is one byte wide), so row r of
// plane k - the chunk the file stores - is out[k * stride + r * chunk_elems ...]. The host
// rounds stride up to nvCOMP's buffer alignment so that every chunk is aligned. Each thread handles 4 consecutive
// elements: one vector load of 4 * itemsize bytes, one 4-byte store per plane (coalesced in both
// directions). Grid-stride loops, so one launch covers a tensor of any size.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// uchar4 stores to out + k * stride + i are aligned only when stride % 4 == 0 (and out is 4-aligned)
#define VEC_OK(out, stride) ((((stride) & 3) == 0) && ((((u64)(out)) & 3) == 0))

#define GRID_STRIDE(q, nq) for (i64 q = (i64)blockIdx.x * blockDim.x + threadIdx.x; q < (nq); q += (i64)gridDim.x * blockDim.x)

// ---------------------------------------------------------------- fieldsplit, 2-byte floats
// bf16: e=8 m=7 (rest is 1 byte, r1 unused); f16: e=5 m=10 (rest is 2 bytes).
__device__ __forceinline__ void fs16(u16 v, int e, int m, u8 &ex, u16 &rest) {
    ex = (u8)((v >> m) & ((1u << e) - 1));
    rest = (u16)(((v >> 15) << m) | (v & ((1u << m) - 1)));
}

extern "C" __global__ void split_fieldsplit16(const u16 *__restrict__ x, u8 *__restrict__ out, i64 n, i64 stride, int e, int m) {
    const int two = (1 + m + 7) / 8 == 2;
    GRID_STRIDE(q, (n + 3) / 4) {
        i64 i = q * 4;
        u8 ex[4], r0[4], r1[4];
        if (i + 4 <= n && VEC_OK(out, stride) && ((((u64)(x + i)) & 7) == 0)) {
            ushort4 v = *(const ushort4 *)(x + i);
            u16 vv[4] = {v.x, v.y, v.z, v.w};
            for (int k = 0; k < 4; k++) { u16 r; fs16(vv[k], e, m, ex[k], r); r0[k] = (u8)r; r1[k] = (u8)(r >> 8); }
            *(uchar4 *)(out + i) = make_uchar4(ex[0], ex[1], ex[2], ex[3]);
            *(uchar4 *)(out + stride + i) = make_uchar4(r0[0], r0[1], r0[2], r0[3]);
            if (two) *(uchar4 *)(out + 2 * stride + i) = make_uchar4(r1[0], r1[1], r1[2], r1[3]);
        } else {
            for (i64 j = i; j < n && j < i + 4; j++) {
                u8 a; u16 r; fs16(x[j], e, m, a, r);
                out[j] = a; out[stride + j] = (u8)r; if (two) out[2 * stride + j] = (u8)(r >> 8);
            }
        }
    }
}

extern "C" __global__ void merge_fieldsplit16(const u8 *__restrict__ planes, u16 *__restrict__ x, i64 n, i64 stride, int e, int m) {
    const int two = (1 + m + 7) / 8 == 2;
    GRID_STRIDE(j, n) {
        u16 r = planes[stride + j] | (two ? (u16)planes[2 * stride + j] << 8 : 0);
        x[j] = (u16)(((r >> m) << 15) | ((u16)planes[j] << m) | (r & ((1u << m) - 1)));
    }
}

// ---------------------------------------------------------------- fieldsplit, f32 (e=8, m=23)
extern "C" __global__ void split_fieldsplit32(const u32 *__restrict__ x, u8 *__restrict__ out, i64 n, i64 stride) {
    GRID_STRIDE(q, (n + 3) / 4) {
        i64 i = q * 4;
        if (i + 4 <= n && VEC_OK(out, stride) && ((((u64)(x + i)) & 15) == 0)) {
            uint4 v = *(const uint4 *)(x + i);
            u32 vv[4] = {v.x, v.y, v.z, v.w};
            u8 p[4][4];
            for (int k = 0; k < 4; k++) {
                u32 r = ((vv[k] >> 31) << 23) | (vv[k] & 0x7FFFFFu);
                p[0][k] = (u8)(vv[k] >> 23); p[1][k] = (u8)r; p[2][k] = (u8)(r >> 8); p[3][k] = (u8)(r >> 16);
            }
            for (int pl = 0; pl < 4; pl++) *(uchar4 *)(out + pl * stride + i) = make_uchar4(p[pl][0], p[pl][1], p[pl][2], p[pl][3]);
        } else {
            for (i64 j = i; j < n && j < i + 4; j++) {
                u32 v = x[j], r = ((v >> 31) << 23) | (v & 0x7FFFFFu);
                out[j] = (u8)(v >> 23); out[stride + j] = (u8)r; out[2 * stride + j] = (u8)(r >> 8); out[3 * stride + j] = (u8)(r >> 16);
            }
        }
    }
}

extern "C" __global__ void merge_fieldsplit32(const u8 *__restrict__ planes, u32 *__restrict__ x, i64 n, i64 stride) {
    GRID_STRIDE(j, n) {
        u32 r = planes[stride + j] | ((u32)planes[2 * stride + j] << 8) | ((u32)planes[3 * stride + j] << 16);
        x[j] = ((r >> 23) << 31) | ((u32)planes[j] << 23) | (r & 0x7FFFFFu);
    }
}

// ---------------------------------------------------------------- delta ops (FORMAT.md "Deltas")
template <typename T> __device__ __forceinline__ T fkey(T v, int is_float) {
    const T sb = (T)1 << (sizeof(T) * 8 - 1);
    return is_float ? (T)(v ^ ((v & sb) ? (T)~(T)0 : sb)) : v;
}
template <typename T> __device__ __forceinline__ T funkey(T k, int is_float) {
    const T sb = (T)1 << (sizeof(T) * 8 - 1);
    return is_float ? ((k & sb) ? (T)(k ^ sb) : (T)~k) : k;
}
// op 0: none, 1: xor, 2: zigzag
template <typename T> __device__ __forceinline__ T delta_enc(T x, T b, int op, int fl) {
    if (op == 1) return x ^ b;
    if (op == 2) { T d = (T)(fkey(x, fl) - fkey(b, fl)); return (T)((T)(d << 1) ^ (T)(0 - (d >> (sizeof(T) * 8 - 1)))); }
    return x;
}
template <typename T> __device__ __forceinline__ T delta_dec(T z, T b, int op, int fl) {
    if (op == 1) return z ^ b;
    if (op == 2) { T d = (T)((z >> 1) ^ (T)(0 - (z & 1))); return funkey((T)(fkey(b, fl) + d), fl); }
    return z;
}

// ---------------------------------------------------------------- bytegroup (+ optional delta first)
template <typename T> __device__ void bytegroup_split(const T *__restrict__ x, const T *__restrict__ base,
                                                      u8 *__restrict__ out, i64 n, i64 stride, int op, int fl) {
    const int S = sizeof(T);
    GRID_STRIDE(q, (n + 3) / 4) {
        i64 i = q * 4;
        T v[4];
        for (int k = 0; k < 4; k++) v[k] = (i + k < n) ? delta_enc(x[i + k], base ? base[i + k] : (T)0, op, fl) : (T)0;
        if (i + 4 <= n && VEC_OK(out, stride)) {
            for (int pl = 0; pl < S; pl++)
                *(uchar4 *)(out + pl * stride + i) = make_uchar4((u8)(v[0] >> (8 * pl)), (u8)(v[1] >> (8 * pl)),
                                                             (u8)(v[2] >> (8 * pl)), (u8)(v[3] >> (8 * pl)));
        } else {
            for (i64 j = i; j < n && j < i + 4; j++)
                for (int pl = 0; pl < S; pl++) out[pl * stride + j] = (u8)(v[j - i] >> (8 * pl));
        }
    }
}

template <typename T> __device__ void bytegroup_merge(const u8 *__restrict__ planes, const T *__restrict__ base,
                                                      T *__restrict__ x, i64 n, i64 stride, int op, int fl) {
    const int S = sizeof(T);
    GRID_STRIDE(j, n) {
        T v = 0;
        for (int pl = 0; pl < S; pl++) v |= (T)planes[pl * stride + j] << (8 * pl);
        x[j] = delta_dec(v, base ? base[j] : (T)0, op, fl);
    }
}

#define BYTEGROUP(T, SUF) \
extern "C" __global__ void split_bytegroup##SUF(const T *x, const T *base, u8 *out, i64 n, i64 stride, int op, int fl) { bytegroup_split<T>(x, base, out, n, stride, op, fl); } \
extern "C" __global__ void merge_bytegroup##SUF(const u8 *planes, const T *base, T *x, i64 n, i64 stride, int op, int fl) { bytegroup_merge<T>(planes, base, x, n, stride, op, fl); }
BYTEGROUP(u8, 1)
BYTEGROUP(u16, 2)
BYTEGROUP(u32, 4)
BYTEGROUP(u64, 8)
