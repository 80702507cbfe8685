// Row checksums on the GPU (FORMAT.md "Checksum"): XXH64, seed 0, of each row of a tensor's
// original bytes; one thread per row, rows hashed in parallel. The host combines the digests
// (XXH64 of the little-endian digest array), exactly as the CPU path does.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

__device__ __forceinline__ u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }
__device__ __forceinline__ u64 rd64(const u8 *p) {
    u64 v = 0;
    for (int k = 7; k >= 0; k--) v = (v << 8) | p[k];
    return v;
}
__device__ __forceinline__ u32 rd32(const u8 *p) { return p[0] | (p[1] << 8) | (p[2] << 16) | ((u32)p[3] << 24); }
__device__ __forceinline__ u64 xround(u64 acc, u64 in) { acc += in * P2; acc = rotl64(acc, 31); return acc * P1; }
__device__ __forceinline__ u64 xmerge(u64 acc, u64 v) { acc ^= xround(0, v); return acc * P1 + P4; }

__device__ u64 xxh64(const u8 *p, u64 len) {
    const u8 *end = p + len;
    u64 h;
    if (len >= 32) {
        u64 v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
        const u8 *limit = end - 32;
        do {
            v1 = xround(v1, rd64(p)); v2 = xround(v2, rd64(p + 8));
            v3 = xround(v3, rd64(p + 16)); v4 = xround(v4, rd64(p + 24)); p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xmerge(h, v1); h = xmerge(h, v2); h = xmerge(h, v3); h = xmerge(h, v4);
    } else {
        h = P5;
    }
    h += len;
    while (p + 8 <= end) { h ^= xround(0, rd64(p)); h = rotl64(h, 27) * P1 + P4; p += 8; }
    if (p + 4 <= end) { h ^= (u64)rd32(p) * P1; h = rotl64(h, 23) * P2 + P3; p += 4; }
    while (p < end) { h ^= (*p) * P5; h = rotl64(h, 11) * P1; p++; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

// digests[r] = XXH64(data[r * row_bytes : min((r + 1) * row_bytes, nbytes)])
extern "C" __global__ void xxh64_rows(const u8 *__restrict__ data, i64 nbytes, i64 row_bytes, u64 *__restrict__ digests) {
    i64 rows = (nbytes + row_bytes - 1) / row_bytes;
    for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += (i64)gridDim.x * blockDim.x) {
        i64 a = r * row_bytes, b = a + row_bytes < nbytes ? a + row_bytes : nbytes;
        digests[r] = xxh64(data + a, (u64)(b - a));
    }
}
