/* Optional fast paths for the CPU backend. Each function computes exactly what the numpy
 * reference in transforms.py / delta.py defines (tests compare them byte for byte) and
 * releases the GIL, so the writer's and reader's threads run it in parallel.
 * Element bytes are little-endian; this file assumes a little-endian host (checked at import). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <stddef.h>

#define MAXP 8

/* The plain byte-moving loops (split, merge, delta) are compiled three times where the toolchain
 * can (GCC 11 or later on x86-64 glibc: musl has no ifunc): for AVX-512 (x86-64-v4), AVX2 and the baseline, the loader picking one
 * by the CPU (an ifunc). Same C, same bytes; about 2x faster on 16-bit planes with AVX-512. */
#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11 && !defined(__clang__) && defined(__ELF__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define WIDE __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
#endif
#ifndef WIDE
#define WIDE
#endif

/* Element types read from and written to caller buffers, at any address: a plane inside a file's
 * mapping, or a hand-made buffer, need not be aligned to its element size, and a plain uint32_t
 * pointer there is undefined behaviour (an SSE memory operand may fault on it). These say
 * "alignment 1", which costs nothing on x86 (unaligned vector loads) and is portable to
 * strict-alignment CPUs. Macros over an element type T use T##_ua. */
typedef uint8_t uint8_t_ua;
typedef uint16_t uint16_t_ua __attribute__((aligned(1)));
typedef uint32_t uint32_t_ua __attribute__((aligned(1)));
typedef uint64_t uint64_t_ua __attribute__((aligned(1)));

static int get_planes(PyObject *seq, Py_buffer *views, int n, int writable, Py_ssize_t len) {
    if (!PyTuple_Check(seq) || PyTuple_GET_SIZE(seq) != n) {
        PyErr_SetString(PyExc_ValueError, "wrong number of planes");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(seq, i), &views[i],
                               writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0) {
            for (int j = 0; j < i; j++) PyBuffer_Release(&views[j]);
            return -1;
        }
        if (views[i].len < len) {
            for (int j = 0; j <= i; j++) PyBuffer_Release(&views[j]);
            PyErr_SetString(PyExc_ValueError, "plane too small");
            return -1;
        }
    }
    return 0;
}

static void release(Py_buffer *v, int n) { for (int i = 0; i < n; i++) PyBuffer_Release(&v[i]); }

/* restrict: planes never alias the source, which lets the compiler vectorise these loops */
WIDE static void bytegroup_split(const uint8_t *restrict s, Py_ssize_t n, int isz, Py_buffer *p) {
    if (isz == 2) { uint8_t *restrict a = p[0].buf, *restrict b = p[1].buf;
        for (Py_ssize_t i = 0; i < n; i++) { a[i] = s[2*i]; b[i] = s[2*i+1]; } }
    else if (isz == 4) { uint8_t *restrict a = p[0].buf, *restrict b = p[1].buf, *restrict c = p[2].buf, *restrict d = p[3].buf;
        for (Py_ssize_t i = 0; i < n; i++) { a[i] = s[4*i]; b[i] = s[4*i+1]; c[i] = s[4*i+2]; d[i] = s[4*i+3]; } }
    else for (int k = 0; k < isz; k++) { uint8_t *restrict a = p[k].buf;
        for (Py_ssize_t i = 0; i < n; i++) a[i] = s[isz*i+k]; }
}

WIDE static void split16(const uint8_t *restrict s, Py_ssize_t n, int e, int m,
                    uint8_t *restrict ex, uint8_t *restrict r0, uint8_t *restrict r1) {
    const uint16_t_ua *restrict x = (const uint16_t_ua *)s;
    const uint16_t emask = (1u << e) - 1, mmask = (1u << m) - 1;
    if (!r1) for (Py_ssize_t i = 0; i < n; i++) { uint16_t v = x[i];
        ex[i] = (uint8_t)((v >> m) & emask); r0[i] = (uint8_t)(((v >> 15) << m) | (v & mmask)); }
    else for (Py_ssize_t i = 0; i < n; i++) { uint16_t v = x[i];
        uint16_t r = (uint16_t)(((v >> 15) << m) | (v & mmask));
        ex[i] = (uint8_t)((v >> m) & emask); r0[i] = (uint8_t)r; r1[i] = (uint8_t)(r >> 8); }
}

WIDE static void split32(const uint8_t *restrict s, Py_ssize_t n, int e, int m, int nr, Py_buffer *p) {
    const uint32_t_ua *restrict x = (const uint32_t_ua *)s;
    const uint32_t emask = (1u << e) - 1, mmask = (1u << m) - 1;
    uint8_t *restrict ex = p[0].buf;
    if (nr == 3) { uint8_t *restrict a = p[1].buf, *restrict b = p[2].buf, *restrict c = p[3].buf;
        for (Py_ssize_t i = 0; i < n; i++) { uint32_t v = x[i]; uint32_t r = ((v >> 31) << m) | (v & mmask);
            ex[i] = (uint8_t)((v >> m) & emask); a[i] = (uint8_t)r; b[i] = (uint8_t)(r >> 8); c[i] = (uint8_t)(r >> 16); } }
    else for (Py_ssize_t i = 0; i < n; i++) { uint32_t v = x[i]; uint32_t r = ((v >> 31) << m) | (v & mmask);
        ex[i] = (uint8_t)((v >> m) & emask);
        for (int k = 0; k < nr; k++) ((uint8_t *)p[1+k].buf)[i] = (uint8_t)(r >> (8*k)); }
}

/* split(src, itemsize, exp_bits, man_bits, planes): exp_bits == 0 means bytegroup. */
static PyObject *split(PyObject *self, PyObject *args) {
    Py_buffer src; int isz, e, m; PyObject *pl; Py_buffer p[MAXP];
    if (!PyArg_ParseTuple(args, "y*iiiO", &src, &isz, &e, &m, &pl)) return NULL;
    Py_ssize_t n = src.len / isz;
    int np_ = e ? 1 + (1 + m + 7) / 8 : isz;
    if (isz < 1 || isz > 8 || np_ > MAXP || get_planes(pl, p, np_, 1, n) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad arguments");
        PyBuffer_Release(&src); return NULL;
    }
    const uint8_t *s = src.buf;
    Py_BEGIN_ALLOW_THREADS
    if (!e) bytegroup_split(s, n, isz, p);
    else if (isz == 2) split16(s, n, e, m, p[0].buf, p[1].buf, np_ == 3 ? p[2].buf : NULL);
    else split32(s, n, e, m, np_ - 1, p);
    Py_END_ALLOW_THREADS
    release(p, np_); PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

/* the inverse of split into o (n elements); pp: np_ plane pointers */
WIDE static void merge_c(const uint8_t *const *pp, Py_ssize_t n, int isz, int e, int m, int np_, uint8_t *o) {
    if (!e) {
        if (isz == 2) { const uint8_t *a = pp[0], *b = pp[1];
            for (Py_ssize_t i = 0; i < n; i++) { o[2*i] = a[i]; o[2*i+1] = b[i]; } }
        else if (isz == 4) { const uint8_t *a = pp[0], *b = pp[1], *c = pp[2], *d = pp[3];
            for (Py_ssize_t i = 0; i < n; i++) { o[4*i] = a[i]; o[4*i+1] = b[i]; o[4*i+2] = c[i]; o[4*i+3] = d[i]; } }
        else for (int k = 0; k < isz; k++) { const uint8_t *a = pp[k];
            for (Py_ssize_t i = 0; i < n; i++) o[isz*i+k] = a[i]; }
    } else if (isz == 2) {
        uint16_t_ua *x = (uint16_t_ua *)o; const uint8_t *ex = pp[0], *r0 = pp[1];
        const uint8_t *r1 = np_ == 3 ? pp[2] : NULL; uint16_t mmask = (1u << m) - 1;
        for (Py_ssize_t i = 0; i < n; i++) { uint16_t r = r0[i] | (r1 ? (uint16_t)r1[i] << 8 : 0);
            x[i] = (uint16_t)(((r >> m) << 15) | ((uint16_t)ex[i] << m) | (r & mmask)); }
    } else if (np_ == 4) {          /* fp32 fieldsplit: three sign+mantissa planes, unrolled */
        uint32_t_ua *restrict x = (uint32_t_ua *)o;
        const uint8_t *restrict ex = pp[0], *restrict a = pp[1], *restrict b = pp[2], *restrict c = pp[3];
        uint32_t mmask = (1u << m) - 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t r = (uint32_t)a[i] | ((uint32_t)b[i] << 8) | ((uint32_t)c[i] << 16);
            x[i] = ((r >> m) << 31) | ((uint32_t)ex[i] << m) | (r & mmask); }
    } else {
        uint32_t_ua *x = (uint32_t_ua *)o; const uint8_t *ex = pp[0]; int nr = np_ - 1;
        uint32_t mmask = (1u << m) - 1;
        for (Py_ssize_t i = 0; i < n; i++) { uint32_t r = 0;
            for (int k = 0; k < nr; k++) r |= (uint32_t)((const uint8_t *)pp[1+k])[i] << (8*k);
            x[i] = ((r >> m) << 31) | ((uint32_t)ex[i] << m) | (r & mmask); }
    }
}

/* merge(planes, itemsize, exp_bits, man_bits, out) */
static PyObject *merge(PyObject *self, PyObject *args) {
    Py_buffer out; int isz, e, m; PyObject *pl; Py_buffer p[MAXP];
    if (!PyArg_ParseTuple(args, "Oiiiw*", &pl, &isz, &e, &m, &out)) return NULL;
    Py_ssize_t n = out.len / isz;
    int np_ = e ? 1 + (1 + m + 7) / 8 : isz;
    if (isz < 1 || isz > 8 || np_ > MAXP || get_planes(pl, p, np_, 0, n) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad arguments");
        PyBuffer_Release(&out); return NULL;
    }
    const uint8_t *pp[MAXP] = {0}; for (int k = 0; k < np_; k++) pp[k] = p[k].buf;
    Py_BEGIN_ALLOW_THREADS
    merge_c(pp, n, isz, e, m, np_, out.buf);
    Py_END_ALLOW_THREADS
    release(p, np_); PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* delta(x, base, out, itemsize, op, is_float, inverse)
 * op 0 xor: d = x ^ b.  op 1 zigzag: d = zz(key(x) - key(b)), key = order-preserving float
 * key when is_float (x ^ (sign ? all ones : sign bit)), identity otherwise. */
#define DELTA_T(T, BITS) do { \
    const T##_ua *X = (const T##_ua *)xs.buf, *B = (const T##_ua *)bs.buf; T##_ua *O = (T##_ua *)os.buf; \
    const T sb = (T)1 << (BITS - 1); \
    if (op == 0) { for (Py_ssize_t i = 0; i < n; i++) O[i] = X[i] ^ B[i]; } \
    else if (!inv) { for (Py_ssize_t i = 0; i < n; i++) { T x = X[i], b = B[i]; \
        if (fl) { x ^= (x & sb) ? (T)~(T)0 : sb; b ^= (b & sb) ? (T)~(T)0 : sb; } \
        T d = (T)(x - b); O[i] = (T)((T)(d << 1) ^ (T)(0 - (d >> (BITS - 1)))); } } \
    else { for (Py_ssize_t i = 0; i < n; i++) { T z = X[i], b = B[i]; \
        if (fl) b ^= (b & sb) ? (T)~(T)0 : sb; \
        T d = (T)((z >> 1) ^ (T)(0 - (z & 1))); T k = (T)(b + d); \
        if (fl) { k = (k & sb) ? (T)(k ^ sb) : (T)~k; } O[i] = k; } } \
} while (0)

typedef struct { void *buf; } ptrbuf;
WIDE static void delta_c(const uint8_t *x, const uint8_t *b, uint8_t *o, Py_ssize_t n, int isz, int op, int fl, int inv) {
    ptrbuf xs = {(void *)x}, bs = {(void *)b}, os = {(void *)o};
    switch (isz) {
        case 1: DELTA_T(uint8_t, 8); break;
        case 2: DELTA_T(uint16_t, 16); break;
        case 4: DELTA_T(uint32_t, 32); break;
        default: DELTA_T(uint64_t, 64); break;
    }
}

static PyObject *delta(PyObject *self, PyObject *args) {
    Py_buffer xs, bs, os; int isz, op, fl, inv;
    if (!PyArg_ParseTuple(args, "y*y*w*iiii", &xs, &bs, &os, &isz, &op, &fl, &inv)) return NULL;
    if (xs.len != bs.len || xs.len != os.len || (isz != 1 && isz != 2 && isz != 4 && isz != 8) || xs.len % isz) {
        PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&os);
        PyErr_SetString(PyExc_ValueError, "bad arguments"); return NULL;
    }
    Py_ssize_t n = xs.len / isz;
    Py_BEGIN_ALLOW_THREADS
    switch (isz) {
        case 1: DELTA_T(uint8_t, 8); break;
        case 2: DELTA_T(uint16_t, 16); break;
        case 4: DELTA_T(uint32_t, 32); break;
        default: DELTA_T(uint64_t, 64); break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&os);
    Py_RETURN_NONE;
}

/* one compiled copy (never inlined), so that every caller gets the very same double */
static void hist4(const uint8_t *src, size_t n, uint32_t *counts);

__attribute__((noinline)) static double entropy_c(const uint8_t *s, Py_ssize_t len, Py_ssize_t step) {
    uint32_t counts[256] = {0}; Py_ssize_t total = 0; double h = 0.0;
    if (step == 1 && len < ((Py_ssize_t)1 << 32)) { hist4(s, (size_t)len, counts); total = len; }  /* the same counts */
    else for (Py_ssize_t i = 0; i < len; i += step) { counts[s[i]]++; total++; }
    for (int k = 0; k < 256; k++) if (counts[k]) { double q = (double)counts[k] / total; h -= q * __builtin_log2(q); }
    return h;
}

/* entropy(buf, step): order-0 entropy in bits per byte of buf[0], buf[step], buf[2*step], ... */
static PyObject *entropy(PyObject *self, PyObject *args) {
    Py_buffer b; Py_ssize_t step;
    if (!PyArg_ParseTuple(args, "y*n", &b, &step)) return NULL;
    if (step < 1) step = 1;
    double h = 0.0;
    Py_BEGIN_ALLOW_THREADS
    h = entropy_c(b.buf, b.len, step);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyFloat_FromDouble(h);
}

/* XXH64 (seed 0..2^64-1), the reference algorithm (xxhash.com), with the GIL released. */
#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t xround(uint64_t acc, uint64_t in) { acc += in * P2; acc = rotl64(acc, 31); return acc * P1; }
static inline uint64_t xmerge(uint64_t acc, uint64_t v) { acc ^= xround(0, v); return acc * P1 + P4; }

/* XXH64's stripe loop with its four accumulators in one ymm (AVX-512 DQ and VL: 64-bit multiply and
 * rotate): the same arithmetic lane by lane, so the same digest, about 1.8x faster here (the scalar
 * loop is bound by one 64-bit multiplier). Chosen at run time (xxh64_simd). */
static int xxh64_simd = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
__attribute__((target("avx512f,avx512vl,avx512dq")))
static const uint8_t *xxh64_stripes_vec(const uint8_t *p, const uint8_t *limit, uint64_t v[4]) {
    __m256i a = _mm256_loadu_si256((const __m256i *)v);
    const __m256i k1 = _mm256_set1_epi64x((long long)P1), k2 = _mm256_set1_epi64x((long long)P2);
    do { __m256i in = _mm256_loadu_si256((const __m256i *)p);
         a = _mm256_mullo_epi64(_mm256_rol_epi64(_mm256_add_epi64(a, _mm256_mullo_epi64(in, k2)), 31), k1);
         p += 32; } while (p <= limit);
    _mm256_storeu_si256((__m256i *)v, a);
    return p;
}
static void xxh64_simd_init(void) {
    __builtin_cpu_init();
    xxh64_simd = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
                 && __builtin_cpu_supports("avx512dq") ? 1 : 0;
}
#else
static const uint8_t *xxh64_stripes_vec(const uint8_t *p, const uint8_t *limit, uint64_t v[4]) { return p; }
static void xxh64_simd_init(void) {}
#endif

/* XXH64's stripe loop over [p, limit + 32) (at least one stripe), its finish from the four
 * accumulators (len >= 32) or the seed, and the tail of fewer than 32 bytes: shared by the one-shot
 * digest and the row hasher below. */
static const uint8_t *xxh64_stripes(const uint8_t *p, const uint8_t *limit, uint64_t v[4]) {
    if (xxh64_simd == 1) return xxh64_stripes_vec(p, limit, v);
    uint64_t v1 = v[0], v2 = v[1], v3 = v[2], v4 = v[3];
    do { v1 = xround(v1, rd64(p)); v2 = xround(v2, rd64(p + 8));
         v3 = xround(v3, rd64(p + 16)); v4 = xround(v4, rd64(p + 24)); p += 32; } while (p <= limit);
    v[0] = v1; v[1] = v2; v[2] = v3; v[3] = v4;
    return p;
}

static uint64_t xxh64_finish(const uint64_t v[4], uint64_t seed, uint64_t len, const uint8_t *p, const uint8_t *end) {
    uint64_t h;
    if (len >= 32) {
        h = rotl64(v[0], 1) + rotl64(v[1], 7) + rotl64(v[2], 12) + rotl64(v[3], 18);
        h = xmerge(h, v[0]); h = xmerge(h, v[1]); h = xmerge(h, v[2]); h = xmerge(h, v[3]);
    } else h = seed + P5;
    h += len;
    while (p + 8 <= end) { h ^= xround(0, rd64(p)); h = rotl64(h, 27) * P1 + P4; p += 8; }
    if (p + 4 <= end) { h ^= (uint64_t)rd32(p) * P1; h = rotl64(h, 23) * P2 + P3; p += 4; }
    while (p < end) { h ^= (*p) * P5; h = rotl64(h, 11) * P1; p++; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

static uint64_t xxh64(const uint8_t *p, size_t len, uint64_t seed) {
    const uint8_t *end = p + len;
    uint64_t v[4] = {seed + P1 + P2, seed + P2, seed, seed - P1};
    if (len >= 32) p = xxh64_stripes(p, end - 32, v);
    return xxh64_finish(v, seed, (uint64_t)len, p, end);
}

/* Row digests (XXH64, seed 0, of consecutive rows of rb bytes; the last may be shorter) of bytes
 * fed in pieces of any size: the context sorts hash the very bytes they read, as they read them,
 * so that a file's row digests always describe what it codes, even if another thread changes the
 * tensor meanwhile (the file then holds some mix of old and new values, but one that decodes and
 * checks: never a damaged file). */
typedef struct { uint64_t v[4]; uint8_t buf[32]; size_t bufn; uint64_t total, left, rest, rb; uint64_t *out; Py_ssize_t k, nout; } rowhash;

static void rowhash_row(rowhash *h) {
    h->v[0] = P1 + P2; h->v[1] = P2; h->v[2] = 0; h->v[3] = 0 - P1; h->bufn = 0; h->total = 0;
    h->left = h->rest < h->rb ? h->rest : h->rb; h->rest -= h->left;
}

/* rows of rb bytes over len bytes in all, digests to out[0 .. nout) (rb 0: hashes nothing) */
static void rowhash_init(rowhash *h, uint64_t rb, uint64_t len, uint64_t *out, Py_ssize_t nout) {
    h->rb = rb; h->rest = rb ? len : 0; h->out = out; h->nout = nout; h->k = 0;
    rowhash_row(h);
}

static void rowhash_bytes(rowhash *h, const uint8_t *p, size_t n) {     /* n bytes of the current row */
    const uint8_t *end = p + n;
    h->total += n;
    if (h->bufn + n < 32) { memcpy(h->buf + h->bufn, p, n); h->bufn += n; return; }
    if (h->bufn) {
        size_t f = 32 - h->bufn;
        memcpy(h->buf + h->bufn, p, f); p += f;
        xxh64_stripes(h->buf, h->buf, h->v); h->bufn = 0;
    }
    if (end - p >= 32) p = xxh64_stripes(p, end - 32, h->v);
    memcpy(h->buf, p, (size_t)(end - p)); h->bufn = (size_t)(end - p);
}

static void rowhash_feed(rowhash *h, const void *data, size_t n) {
    const uint8_t *p = data;
    while (n && h->left) {
        size_t k = n < h->left ? n : (size_t)h->left;
        rowhash_bytes(h, p, k); p += k; n -= k; h->left -= k;
        if (!h->left) {
            if (h->k < h->nout) h->out[h->k] = xxh64_finish(h->v, 0, h->total, h->buf, h->buf + h->bufn);
            h->k++;
            rowhash_row(h);
        }
    }
}

/* xxh64_simd(flag=-1) -> 1 when the vector stripe loop is on; 0/1 turns it off/on (tests) */
static PyObject *py_xxh64_simd(PyObject *self, PyObject *args) {
    int flag = -1;
    if (!PyArg_ParseTuple(args, "|i", &flag)) return NULL;
    if (flag == 0) xxh64_simd = 0;
    else if (flag == 1) xxh64_simd_init();
    return PyLong_FromLong(xxh64_simd);
}

static PyObject *py_xxh64(PyObject *self, PyObject *args) {
    Py_buffer b; unsigned long long seed = 0;
    if (!PyArg_ParseTuple(args, "y*|K", &b, &seed)) return NULL;
    uint64_t h;
    Py_BEGIN_ALLOW_THREADS
    h = xxh64(b.buf, (size_t)b.len, seed);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

/* ------------------------------------------------------------------------------------------
 * huff_frame: one standard zstd frame (RFC 8878) holding a chunk as a single compressed block
 * of Huffman-coded literals and no sequences. On float exponent planes LZ matches are short and
 * spurious; a literals-only block codes them near their order-0 entropy, fast, and any zstd
 * decoder (libzstd, nvCOMP) reads it. Returns the frame size, or 0 when this form does not
 * apply (fewer than 2 symbols, a symbol above 128, size out of range, or no gain): the caller
 * then uses libzstd. */
#define HUF_MAXBITS 11

typedef struct { uint32_t count; int sym; } hsym;

static int cmp_hsym(const void *a, const void *b) {
    const hsym *x = a, *y = b;
    if (x->count != y->count) return x->count < y->count ? -1 : 1;
    return x->sym - y->sym;
}

/* Huffman code lengths (two-queue method on sorted counts), then limited to HUF_MAXBITS and
 * made complete (Kraft sum exactly 1, as zstd requires). */
static void huff_lengths(const uint32_t *counts, int maxsym, uint8_t *len) {
    hsym s[257]; int m = 0;
    for (int k = 0; k <= maxsym; k++) { len[k] = 0; if (counts[k]) { s[m].count = counts[k]; s[m].sym = k; m++; } }
    qsort(s, m, sizeof(hsym), cmp_hsym);
    uint64_t w[2 * 257]; int parent[2 * 257];
    for (int i = 0; i < m; i++) w[i] = s[i].count;
    int leaf = 0, node = m, nodes_end = m;
    for (int k = 0; k < m - 1; k++) {          /* build internal nodes m .. 2m-2 */
        int pick[2];
        for (int t = 0; t < 2; t++) {
            if (leaf < m && (node >= nodes_end || w[leaf] <= w[node])) pick[t] = leaf++;
            else pick[t] = node++;
        }
        w[nodes_end] = w[pick[0]] + w[pick[1]];
        parent[pick[0]] = parent[pick[1]] = nodes_end;
        nodes_end++;
    }
    if (m < 2) { if (m == 1) len[s[0].sym] = 1; return; }
    int depth[2 * 257]; depth[nodes_end - 1] = 0;
    for (int i = nodes_end - 2; i >= 0; i--) depth[i] = depth[parent[i]] + 1;
    int L[257];
    for (int i = 0; i < m; i++) L[i] = depth[i] > HUF_MAXBITS ? HUF_MAXBITS : depth[i];
    /* Kraft sum in units of 2^-MAXBITS */
    int64_t K = 0, ONE = (int64_t)1 << HUF_MAXBITS;
    for (int i = 0; i < m; i++) K += (int64_t)1 << (HUF_MAXBITS - L[i]);
    /* too long a sum: lengthen the rarest codes that can still grow (s[] is rarest first) */
    while (K > ONE) {
        for (int i = 0; i < m && K > ONE; i++)
            if (L[i] < HUF_MAXBITS) { K -= (int64_t)1 << (HUF_MAXBITS - L[i] - 1); L[i]++; }
    }
    /* incomplete: shorten the most frequent codes whose shortening still fits */
    while (K < ONE) {
        int done = 0;
        for (int i = m - 1; i >= 0 && K < ONE; i--) {
            int64_t add = (int64_t)1 << (HUF_MAXBITS - L[i]);
            if (L[i] > 1 && K + add <= ONE) { K += add; L[i]--; done = 1; }
        }
        if (!done) break;
    }
    for (int i = 0; i < m; i++) len[s[i].sym] = (uint8_t)L[i];
}

typedef struct { uint8_t *out; size_t pos, cap; uint64_t acc; int bits; int overflow; } bitw;

static inline void bw_flush(bitw *b) {
    if (b->pos + 8 > b->cap) { b->overflow = 1; b->pos = 0; }
    memcpy(b->out + b->pos, &b->acc, 8);       /* little-endian host (checked at import) */
    int nbytes = b->bits >> 3;
    b->pos += nbytes; b->acc = nbytes == 8 ? 0 : b->acc >> (8 * nbytes); b->bits &= 7;
}

/* one Huffman stream: symbols last to first, then the end-mark bit. Returns bytes written.
 * ct[c] = code | nbBits << 16. Four symbols (at most 44 bits) between flushes, looked up one at a
 * time, or two at a time in pt when given: pt[(b1 << 7) | b0] = the codes of b1 then b0 (b1 =
 * src[i-1] is coded first) as code | nbBits << 22, for symbols below 128 (HUF_PAIRS entries,
 * filled by huff_pairs for the symbols present). The same bits either way. */
#define HUF_PAIRS (128 * 128)
static size_t huff_stream(const uint8_t *src, size_t n, const uint32_t *ct, const uint32_t *pt, uint8_t *out,
                          size_t cap, int *overflow) {
    bitw b = {out, 0, cap, 0, 0, 0};
    size_t i = n;
    if (cap < n * 2 + 16) { *overflow = 1; return 0; }   /* 11 bits a symbol at most: no checks needed */
    uint64_t acc = 0; int bits = 0; uint8_t *o = out;
    if (pt) while (i >= 4) {
        uint32_t q0 = pt[((uint32_t)src[i - 1] << 7) | src[i - 2]], q1 = pt[((uint32_t)src[i - 3] << 7) | src[i - 4]];
        i -= 4;
        acc |= (uint64_t)(q0 & 0x3FFFFF) << bits; bits += (int)(q0 >> 22);
        acc |= (uint64_t)(q1 & 0x3FFFFF) << bits; bits += (int)(q1 >> 22);
        memcpy(o, &acc, 8);
        int nb = bits >> 3; o += nb; acc >>= 8 * nb; bits &= 7;
    }
    else while (i >= 4) {
        uint32_t e0 = ct[src[i - 1]], e1 = ct[src[i - 2]], e2 = ct[src[i - 3]], e3 = ct[src[i - 4]];
        i -= 4;
        acc |= (uint64_t)(e0 & 0xFFFF) << bits; bits += e0 >> 16;
        acc |= (uint64_t)(e1 & 0xFFFF) << bits; bits += e1 >> 16;
        acc |= (uint64_t)(e2 & 0xFFFF) << bits; bits += e2 >> 16;
        acc |= (uint64_t)(e3 & 0xFFFF) << bits; bits += e3 >> 16;
        memcpy(o, &acc, 8);
        int nb = bits >> 3; o += nb; acc >>= 8 * nb; bits &= 7;
    }
    b.pos = (size_t)(o - out); b.acc = acc; b.bits = bits;
    while (i > 0) { uint32_t e = ct[src[--i]]; b.acc |= (uint64_t)(e & 0xFFFF) << b.bits; b.bits += e >> 16; bw_flush(&b); }
    b.acc |= (uint64_t)1 << b.bits; b.bits += 1;
    bw_flush(&b);
    if (b.overflow) { *overflow = 1; return 0; }
    return b.pos + (b.bits ? 1 : 0);
}

static void huff_pairs(const uint32_t *ct, const uint32_t *counts, int maxsym, uint32_t *pt) {
    uint8_t used[128]; int nu = 0;
    for (int k = 0; k <= maxsym; k++) if (counts[k]) used[nu++] = (uint8_t)k;
    for (int x = 0; x < nu; x++) {
        uint32_t e1 = ct[used[x]], c1 = e1 & 0xFFFF, l1 = e1 >> 16;
        for (int y = 0; y < nu; y++) {
            uint32_t e0 = ct[used[y]];
            pt[((uint32_t)used[x] << 7) | used[y]] = (c1 | (e0 & 0xFFFF) << l1) | (l1 + (e0 >> 16)) << 22;
        }
    }
}

/* byte counts of src[0:n] (n < 2^32), with four tables so that repeated bytes do not stall */
static void hist4_scalar(const uint8_t *src, size_t n, uint32_t *counts) {
    uint32_t c4[4][256] = {{0}};
    size_t i4 = 0;
    for (; i4 + 4 <= n; i4 += 4) { c4[0][src[i4]]++; c4[1][src[i4 + 1]]++; c4[2][src[i4 + 2]]++; c4[3][src[i4 + 3]]++; }
    for (; i4 < n; i4++) c4[0][src[i4]]++;
    for (int k = 0; k < 256; k++) counts[k] = c4[0][k] + c4[1][k] + c4[2][k] + c4[3][k];
}

/* Byte histograms of planes with a few frequent values (a float's exponent plane: a handful of
 * binades hold almost every weight), with AVX-512 BW: the values that hold 1/256 or more of a 4 KB
 * sample (at most HIST_HOT of them) are compared with 64 bytes at a time and counted with popcnt,
 * where together they hold 7/8 of the sample or more; the other bytes of each group are counted
 * one by one. The same counts as hist4_scalar (tested); planes without such values (mantissas)
 * take the scalar loop. Chosen at run time (hist_simd). */
#define HIST_HOT 24
#define HIST_SAMPLE 4096
static int hist_simd = -1;            /* -1: not yet probed; 0: off; 1: on */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* 64 bytes v against the hot values (hv[h], at most HIST_HOT or CTXM_HOT of them): hc[h] += the
 * bytes equal to hv[h]; returns the mask of the bytes equal to none, for the caller to count one
 * by one (hist_hot's and ctx_hist16_simd's loop) */
__attribute__((target("avx512f,avx512bw,popcnt")))
static inline uint64_t hot_count64(__m512i v, const __m512i *hv, int nhot, uint64_t *hc) {
    uint64_t seen = 0;
    for (int h = 0; h < nhot; h++) {
        uint64_t m = _mm512_cmpeq_epi8_mask(v, hv[h]);
        hc[h] += (uint64_t)__builtin_popcountll(m); seen |= m;
    }
    return ~seen;
}
__attribute__((target("avx512f,avx512bw,popcnt")))
static void hist_hot(const uint8_t *src, size_t n, uint32_t *counts, const uint8_t *hot, int nhot) {
    uint64_t hc[HIST_HOT] = {0};
    __m512i hv[HIST_HOT];
    for (int h = 0; h < nhot; h++) hv[h] = _mm512_set1_epi8((char)hot[h]);
    memset(counts, 0, 256 * sizeof(uint32_t));
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t rest = hot_count64(_mm512_loadu_si512((const void *)(src + i)), hv, nhot, hc);
        for (; rest; rest &= rest - 1) counts[src[i + (size_t)__builtin_ctzll(rest)]]++;
    }
    for (; i < n; i++) counts[src[i]]++;
    for (int h = 0; h < nhot; h++) counts[hot[h]] += (uint32_t)hc[h];
}
static void hist_simd_init(void) {
    __builtin_cpu_init();
    hist_simd = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 1 : 0;
}
#else
static void hist_hot(const uint8_t *src, size_t n, uint32_t *counts, const uint8_t *hot, int nhot) {}
static void hist_simd_init(void) { hist_simd = 0; }
#endif

/* counts[256] of the n bytes of src (n < 2^32) */
static void hist4(const uint8_t *src, size_t n, uint32_t *counts) {
    if (hist_simd < 0) hist_simd_init();
    if (hist_simd == 1 && n >= 4 * HIST_SAMPLE) {
        uint32_t sc[256] = {0};
        for (size_t i = 0; i < HIST_SAMPLE; i++) sc[src[i]]++;
        uint8_t hot[HIST_HOT]; int nhot = 0;
        for (int k = 0; k < 256 && nhot < HIST_HOT; k++) if (sc[k] * 256 >= HIST_SAMPLE) hot[nhot++] = (uint8_t)k;
        uint32_t covered = 0;
        for (int h = 0; h < nhot; h++) covered += sc[hot[h]];
        if (covered * 8 >= HIST_SAMPLE * 7) { hist_hot(src, n, counts, hot, nhot); return; }   /* 7/8 or more */
    }
    hist4_scalar(src, n, counts);
}

/* hist(buf) -> list of 256 counts (hist4, as the coders take them); hist_simd(flag=-1) -> 1 when
 * the vector path is on, 0/1 turns it off/on (tests) */
static PyObject *py_hist(PyObject *self, PyObject *args) {
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*", &b)) return NULL;
    if (b.len >= ((Py_ssize_t)1 << 32)) { PyBuffer_Release(&b); PyErr_SetString(PyExc_ValueError, "buffer too large"); return NULL; }
    uint32_t c[256];
    Py_BEGIN_ALLOW_THREADS
    hist4(b.buf, (size_t)b.len, c);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    PyObject *out = PyList_New(256);
    if (!out) return NULL;
    for (int k = 0; k < 256; k++) PyList_SET_ITEM(out, k, PyLong_FromUnsignedLong(c[k]));
    return out;
}

static PyObject *py_hist_simd(PyObject *self, PyObject *args) {
    int flag = -1;
    if (!PyArg_ParseTuple(args, "|i", &flag)) return NULL;
    if (flag == 0) hist_simd = 0;
    else if (flag == 1) hist_simd_init();
    else if (hist_simd < 0) hist_simd_init();
    return PyLong_FromLong(hist_simd);
}

/* pt: HUF_PAIRS scratch entries for the two-symbol look-ups, or NULL (one symbol a look-up) */
static size_t huff_frame_c(const uint8_t *src, size_t n, uint8_t *dst, size_t cap, uint32_t *pt) {
    if (n < 256 || n > (128u << 10) || cap < 2 * n + 256) return 0;
    uint32_t counts[256];
    hist4(src, n, counts);
    int maxsym = 255, distinct = 0;
    while (maxsym > 0 && !counts[maxsym]) maxsym--;
    for (int k = 0; k <= maxsym; k++) distinct += counts[k] != 0;
    if (distinct < 2 || maxsym > 128) return 0;
    uint8_t len[256] = {0};
    huff_lengths(counts, maxsym, len);
    int maxbits = 0;
    for (int k = 0; k <= maxsym; k++) if (len[k] > maxbits) maxbits = len[k];
    /* canonical codes in zstd's order: longest codes first, by symbol, from 0 */
    uint16_t code[256] = {0}; uint32_t next = 0;
    for (int l = maxbits; l >= 1; l--) {
        for (int k = 0; k <= maxsym; k++) if (len[k] == l) code[k] = (uint16_t)next++;
        if (next & 1) return 0;              /* incomplete code: never for a complete one */
        next >>= 1;
    }
    uint32_t ct[256] = {0};
    for (int k = 0; k <= maxsym; k++) ct[k] = code[k] | ((uint32_t)len[k] << 16);
    /* frame header: magic, descriptor (single segment), content size */
    size_t p = 0;
    static const uint8_t magic[4] = {0x28, 0xB5, 0x2F, 0xFD};
    memcpy(dst, magic, 4); p = 4;
    if (n < 256) { dst[p++] = 0x20; dst[p++] = (uint8_t)n; }
    else if (n <= 65791) { dst[p++] = 0x60; uint16_t v = (uint16_t)(n - 256); memcpy(dst + p, &v, 2); p += 2; }
    else { dst[p++] = 0xA0; uint32_t v = (uint32_t)n; memcpy(dst + p, &v, 4); p += 4; }
    size_t block_hdr = p; p += 3;
    size_t lit_hdr = p; p += 5;              /* size format 3: 18-bit sizes, 4 streams */
    size_t tree = p;
    dst[p++] = (uint8_t)(127 + maxsym);      /* direct weights for symbols 0..maxsym-1 */
    for (int k = 0; k < maxsym; k += 2) {
        uint8_t w0 = len[k] ? (uint8_t)(maxbits + 1 - len[k]) : 0;
        uint8_t w1 = (k + 1 < maxsym && len[k + 1]) ? (uint8_t)(maxbits + 1 - len[k + 1]) : 0;
        dst[p++] = (uint8_t)((w0 << 4) | w1);
    }
    size_t jump = p; p += 6;
    size_t seg = (n + 3) / 4, sizes[4]; int overflow = 0;
    if (maxsym >= 128) pt = NULL;            /* (pairs are indexed by two 7-bit symbols) */
    if (pt) huff_pairs(ct, counts, maxsym, pt);
    for (int t = 0; t < 4; t++) {
        size_t a = seg * t, e = t == 3 ? n : seg * (t + 1);
        if (p >= cap) return 0;
        sizes[t] = huff_stream(src + a, e - a, ct, pt, dst + p, cap - p, &overflow);
        if (overflow) return 0;
        p += sizes[t];
    }
    for (int t = 0; t < 3; t++) {
        if (sizes[t] > 65535) return 0;
        dst[jump + 2 * t] = (uint8_t)sizes[t]; dst[jump + 2 * t + 1] = (uint8_t)(sizes[t] >> 8);
    }
    size_t comp = p - tree;                  /* tree description + jump table + streams */
    if (comp >= (1u << 18)) return 0;
    uint64_t lh = 2u | (3u << 2) | ((uint64_t)n << 4) | ((uint64_t)comp << 22);
    for (int t = 0; t < 5; t++) dst[lit_hdr + t] = (uint8_t)(lh >> (8 * t));
    dst[p++] = 0;                            /* no sequences */
    size_t bsize = p - block_hdr - 3;
    uint32_t bh = 1u | (2u << 1) | ((uint32_t)bsize << 3);
    dst[block_hdr] = (uint8_t)bh; dst[block_hdr + 1] = (uint8_t)(bh >> 8); dst[block_hdr + 2] = (uint8_t)(bh >> 16);
    return p < n ? p : 0;
}

static PyObject *huff_frame(PyObject *self, PyObject *args) {
    Py_buffer src, dst;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &dst)) return NULL;
    size_t r;
    Py_BEGIN_ALLOW_THREADS
    uint32_t *pt = malloc(HUF_PAIRS * sizeof(uint32_t));   /* (without it, one symbol a look-up) */
    r = huff_frame_c(src.buf, (size_t)src.len, dst.buf, (size_t)dst.len, pt);
    free(pt);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src); PyBuffer_Release(&dst);
    return PyLong_FromSize_t(r);
}

/* ------------------------------------------------------------------------------------------
 * masked layout (transforms.split_masked / merge_masked): bit i%8 of mask byte i/8 marks a
 * nonzero element; the nonzero elements' bytes are byte-grouped into planes. */
/* Branchless gather: every element's bytes are written at position nnz, and nnz advances by
 * one only for a nonzero element (planes hold n bytes, so the write is always in bounds). */
#define MASKED_SPLIT_T(T, ISZ) do { \
    const T##_ua *x = (const T##_ua *)s; \
    for (Py_ssize_t i = 0; i < n; i += 8) { \
        uint8_t bits = 0; Py_ssize_t lim = n - i < 8 ? n - i : 8; \
        for (Py_ssize_t t = 0; t < lim; t++) { \
            T v; memcpy(&v, x + i + t, ISZ); \
            uint8_t nz = v != 0; \
            for (int k = 0; k < ISZ; k++) pb[k][nnz] = (uint8_t)(v >> (8 * k)); \
            nnz += nz; bits |= (uint8_t)(nz << t); \
        } \
        m[i >> 3] = bits; \
    } \
} while (0)

/* masked_split(src, itemsize, mask_out, planes) -> nnz; planes must hold n bytes each */
static PyObject *masked_split(PyObject *self, PyObject *args) {
    Py_buffer src, mask; int isz; PyObject *pl; Py_buffer p[MAXP];
    if (!PyArg_ParseTuple(args, "y*iw*O", &src, &isz, &mask, &pl)) return NULL;
    Py_ssize_t n = isz > 0 ? src.len / isz : 0;
    if ((isz != 1 && isz != 2 && isz != 4 && isz != 8) || mask.len < (n + 7) / 8 || get_planes(pl, p, isz, 1, n) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad arguments");
        PyBuffer_Release(&src); PyBuffer_Release(&mask); return NULL;
    }
    Py_ssize_t nnz = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *s = src.buf; uint8_t *m = mask.buf; uint8_t *pb[8];
    for (int k = 0; k < isz; k++) pb[k] = p[k].buf;
    switch (isz) {
        case 1: MASKED_SPLIT_T(uint8_t, 1); break;
        case 2: MASKED_SPLIT_T(uint16_t, 2); break;
        case 4: MASKED_SPLIT_T(uint32_t, 4); break;
        default: MASKED_SPLIT_T(uint64_t, 8); break;
    }
    Py_END_ALLOW_THREADS
    release(p, isz); PyBuffer_Release(&src); PyBuffer_Release(&mask);
    return PyLong_FromSsize_t(nnz);
}

/* Branchless scatter: element i takes the next stored value if its bit is set, else zero; the
 * read index is clamped so that it stays in bounds, and the bit count is checked against nnz. */
#define MASKED_MERGE_T(T, ISZ) do { \
    T##_ua *o = (T##_ua *)out.buf; Py_ssize_t last = nnz > 0 ? nnz - 1 : 0; \
    for (Py_ssize_t i = 0; i < n; i++) { \
        T bit = (T)((m[i >> 3] >> (i & 7)) & 1); \
        Py_ssize_t r = j < last ? j : last; \
        T v = 0; \
        if (nnz) for (int k = 0; k < ISZ; k++) v |= (T)pb[k][r] << (8 * k); \
        o[i] = v & (T)(0 - bit); \
        j += (Py_ssize_t)bit; \
    } \
} while (0)

/* masked_merge(mask, planes, nnz, itemsize, out) -> 0, or -1 if the mask's bit count is not nnz */
static PyObject *masked_merge(PyObject *self, PyObject *args) {
    Py_buffer mask, out; PyObject *pl; Py_ssize_t nnz; int isz; Py_buffer p[MAXP];
    if (!PyArg_ParseTuple(args, "y*Oniw*", &mask, &pl, &nnz, &isz, &out)) return NULL;
    Py_ssize_t n = isz > 0 ? out.len / isz : 0;
    if ((isz != 1 && isz != 2 && isz != 4 && isz != 8) || nnz < 0 || nnz > n || mask.len < (n + 7) / 8
            || out.len % isz || get_planes(pl, p, isz, 0, nnz) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad arguments");
        PyBuffer_Release(&mask); PyBuffer_Release(&out); return NULL;
    }
    Py_ssize_t j = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *m = mask.buf; const uint8_t *pb[8];
    for (int k = 0; k < isz; k++) pb[k] = p[k].buf;
    switch (isz) {
        case 1: MASKED_MERGE_T(uint8_t, 1); break;
        case 2: MASKED_MERGE_T(uint16_t, 2); break;
        case 4: MASKED_MERGE_T(uint32_t, 4); break;
        default: MASKED_MERGE_T(uint64_t, 8); break;
    }
    Py_END_ALLOW_THREADS
    release(p, isz); PyBuffer_Release(&mask); PyBuffer_Release(&out);
    return PyLong_FromLong(j == nnz ? 0 : -1);
}

/* ------------------------------------------------------------------------------------------
 * Context-sorted deltas (ctxdelta.py, FORMAT.md "Context-sorted deltas"): elements are stably
 * counting-sorted by the context c(y) = (y >> s) & (2^w - 1) of their base element y. Encoding
 * scatters each element's delta to the next free position of its context; decoding gathers it
 * back from there. One histogram pass over the base, one pass over the elements. */
#define CTX_MAXW 12
/* The vector moves' hot contexts: those with 1/128 of the part's elements or more (at most
 * CTXM_HOT), compared with every group without a branch; the others are found group by group.
 * (Measured for ctxm: up to 99.5% of the part, 1.8x slower; 1/64 or 1/256 of it, 1.03-1.5x.) */
#define CTXM_HOT 16
#define CTXM_HOT_SHARE 128
static int ctxm_simd;
static void ctxm_simd_init(void);
static int ctxm_hot(const uint64_t *C, int nc, Py_ssize_t n, unsigned *hot);
/* the AVX-512 moves of a block of CTX_T (2-byte elements; defined with ctxm's below; for 4-byte
 * elements a 16-wide version was 1.1-1.3x slower than the scalar moves, and was dropped):
 * forward, each delta db[j] to O[pos[cb[j]]++]; inverse, db[j] = X[pos[cb[j]]++] */
static void ctxs_move16(const uint16_t *cb, const uint16_t *db, Py_ssize_t m, uint64_t *pos, uint16_t_ua *O,
                        const unsigned *hot, int nhot);
static void ctxs_gather16(const uint16_t *cb, uint16_t *db, Py_ssize_t m, uint64_t *pos, const uint16_t_ua *X,
                          const unsigned *hot, int nhot);
/* The part is cut into CTX_K sub-parts moved in step (element j of each in turn), each from its
 * own offsets (a sub-part's first position per context: the part's, plus the earlier sub-parts'
 * counts), so that the offset increments form CTX_K independent chains the CPU overlaps; the
 * order within each context stays the elements' order. Blocks of CTX_BLK elements of each
 * sub-part have their deltas and contexts computed first, in branchless loops the compiler
 * vectorises: key(v) = v ^ (-(v >> (B-1)) | sign bit), its inverse k ^ (((k >> (B-1)) - 1) | sign bit). */
#define CTX_BLK 1024
#define CTX_K 4                  /* the moves below are written out for 4 */
#define CTX_CX(T) ((uint16_t)((y >> s) & cm))
#define CTX_ENC(T, BITS, x0, b0, dst) do { T x = (x0), b = (b0); \
    if (op == 0) dst = x ^ b; else { \
        x ^= (T)(((T)(0 - (T)(x >> (BITS - 1))) | sb) & fm); b ^= (T)(((T)(0 - (T)(b >> (BITS - 1))) | sb) & fm); \
        T v = (T)(x - b); dst = (T)((T)(v << 1) ^ (T)(0 - (T)(v >> (BITS - 1)))); } } while (0)
#define CTX_DEC(T, BITS, z0, b0, dst) do { T z = (z0), b = (b0); \
    if (op == 0) dst = z ^ b; else { \
        b ^= (T)(((T)(0 - (T)(b >> (BITS - 1))) | sb) & fm); \
        T k_ = (T)(b + (T)((z >> 1) ^ (T)(0 - (T)(z & 1)))); \
        dst = (T)(k_ ^ (T)(((T)((T)(k_ >> (BITS - 1)) - 1) | sb) & fm)); } } while (0)
/* row_bytes and digests of ctxm and ctx: none (0, None), or whole elements per row and room for
 * a digest per row of the part's len bytes */
static int rowhash_args_ok(Py_ssize_t rb, int isz, Py_ssize_t len, const Py_buffer *dg) {
    if (!dg) return rb == 0;
    return rb > 0 && rb % isz == 0 && (uintptr_t)dg->buf % 8 == 0 && dg->len / 8 >= len / rb + (len % rb != 0);
}

#define CTX_T(T, BITS) do { \
    const T##_ua *X = (const T##_ua *)xs.buf, *Y = (const T##_ua *)bs.buf; T##_ua *O = (T##_ua *)os.buf; \
    const T sb = (T)1 << (BITS - 1); const T cm = (T)((1u << w) - 1); const T fm = fl ? (T)~(T)0 : (T)0; \
    /* sub-parts 0-2 hold L elements each, sub-part 3 the rest; hashing, L is whole rows */ \
    const Py_ssize_t relem = have_dg ? rb / (Py_ssize_t)sizeof(T) : 1; \
    const Py_ssize_t L = n / CTX_K / relem * relem; const int nc = 1 << w; \
    if (sizeof(T) == 2 && w <= 8 && ctxm_simd == 1)     /* (sub is zeroed: the vector count adds to it) */ \
        for (int k = 0; k < CTX_K; k++) \
            ctx_hist16_simd((const uint16_t_ua *)(Y + k * L), k < CTX_K - 1 ? L : n - (CTX_K - 1) * L, s, w, sub + k * nc); \
    else { \
        for (Py_ssize_t j = 0; j < L; j++) for (int k = 0; k < CTX_K; k++) { T y = Y[k * L + j]; sub[k * nc + CTX_CX(T)]++; } \
        for (Py_ssize_t j = CTX_K * L; j < n; j++) { T y = Y[j]; sub[(CTX_K - 1) * nc + CTX_CX(T)]++; } } \
    for (int c = 0; c < nc; c++) { uint64_t h = 0; for (int k = 0; k < CTX_K; k++) h += sub[k * nc + c]; hist[c] = h; } \
    if (!have_ob) { uint64_t run = 0; for (int c = 0; c < nc; c++) { off[c] = run; run += hist[c]; } } \
    for (int c = 0; c < nc; c++) { uint64_t o = off[c]; for (int k = 0; k < CTX_K; k++) { uint64_t h = sub[k * nc + c]; sub[k * nc + c] = o; o += h; } \
        if (hist[c] && (o < off[c] || o > (uint64_t)nsorted)) bad = 1; } \
    T dbuf[CTX_K][CTX_BLK]; uint16_t cbuf[CTX_K][CTX_BLK]; T (*xl)[CTX_BLK] = (T (*)[CTX_BLK])xlb; \
    uint64_t *restrict s0 = sub, *restrict s1 = sub + nc, *restrict s2 = sub + 2 * nc, *restrict s3 = sub + 3 * nc; \
    uint64_t *sk[CTX_K] = {s0, s1, s2, s3}; \
    rowhash rh[CTX_K]; \
    for (int k = 0; k < CTX_K; k++) \
        rowhash_init(&rh[k], have_dg && !inv ? (uint64_t)rb : 0, (uint64_t)((k < CTX_K - 1 ? L : n - (CTX_K - 1) * L) * (Py_ssize_t)sizeof(T)), \
                     have_dg ? (uint64_t *)dg.buf + (k * L) / relem : NULL, have_dg ? dg.len / 8 - (k * L) / relem : 0); \
    const int vec = sizeof(T) == 2 && ctxm_simd == 1; \
    unsigned hot[CTXM_HOT]; const int nhot = vec ? ctxm_hot(hist, nc, n, hot) : 0; \
    for (Py_ssize_t j0 = 0; j0 < L && !bad; j0 += CTX_BLK) { \
        Py_ssize_t m = L - j0 < CTX_BLK ? L - j0 : CTX_BLK; \
        for (int k = 0; k < CTX_K; k++) { const T##_ua *y_ = Y + k * L + j0; \
            for (Py_ssize_t j = 0; j < m; j++) { T y = y_[j]; cbuf[k][j] = CTX_CX(T); } } \
        if (!inv) { \
            for (int k = 0; k < CTX_K; k++) { const T##_ua *y_ = Y + k * L + j0; \
                memcpy(xl[k], (const void *)(X + k * L + j0), (size_t)m * sizeof(T)); /* read once: deltas, digests */ \
                rowhash_feed(&rh[k], xl[k], (size_t)m * sizeof(T)); \
                for (Py_ssize_t j = 0; j < m; j++) CTX_ENC(T, BITS, xl[k][j], y_[j], dbuf[k][j]); \
                if (K) memcpy(K + (k * L + j0) * (Py_ssize_t)sizeof(T), xl[k], (size_t)m * sizeof(T)); } \
            if (vec) for (int k = 0; k < CTX_K; k++) \
                ctxs_move16(cbuf[k], (const uint16_t *)dbuf[k], m, sk[k], (uint16_t_ua *)O, hot, nhot); \
            else for (Py_ssize_t j = 0; j < m; j++) { \
                O[s0[cbuf[0][j]]++] = dbuf[0][j]; O[s1[cbuf[1][j]]++] = dbuf[1][j]; \
                O[s2[cbuf[2][j]]++] = dbuf[2][j]; O[s3[cbuf[3][j]]++] = dbuf[3][j]; } \
        } else { \
            if (vec) for (int k = 0; k < CTX_K; k++) \
                ctxs_gather16(cbuf[k], (uint16_t *)dbuf[k], m, sk[k], (const uint16_t_ua *)X, hot, nhot); \
            else for (Py_ssize_t j = 0; j < m; j++) { \
                dbuf[0][j] = X[s0[cbuf[0][j]]++]; dbuf[1][j] = X[s1[cbuf[1][j]]++]; \
                dbuf[2][j] = X[s2[cbuf[2][j]]++]; dbuf[3][j] = X[s3[cbuf[3][j]]++]; } \
            for (int k = 0; k < CTX_K; k++) { const T##_ua *y_ = Y + k * L + j0; T##_ua *o_ = O + k * L + j0; \
                for (Py_ssize_t j = 0; j < m; j++) CTX_DEC(T, BITS, dbuf[k][j], y_[j], o_[j]); } \
        } \
    } \
    /* the rest of sub-part 3, [CTX_K * L, n), block by block from its offsets */ \
    for (Py_ssize_t j0 = CTX_K * L; j0 < n && !bad; j0 += CTX_BLK) { \
        Py_ssize_t m = n - j0 < CTX_BLK ? n - j0 : CTX_BLK; \
        if (m < 1) break;          /* (never: tells GCC the memcpy below has a sane size) */ \
        for (Py_ssize_t j = 0; j < m; j++) { T y = Y[j0 + j]; cbuf[0][j] = CTX_CX(T); } \
        if (!inv) { \
            memcpy(xl[0], (const void *)(X + j0), (size_t)m * sizeof(T)); \
            rowhash_feed(&rh[CTX_K - 1], xl[0], (size_t)m * sizeof(T)); \
            for (Py_ssize_t j = 0; j < m; j++) CTX_ENC(T, BITS, xl[0][j], Y[j0 + j], dbuf[0][j]); \
            if (K) memcpy(K + j0 * (Py_ssize_t)sizeof(T), xl[0], (size_t)m * sizeof(T)); \
            if (vec) ctxs_move16(cbuf[0], (const uint16_t *)dbuf[0], m, s3, (uint16_t_ua *)O, hot, nhot); \
            else for (Py_ssize_t j = 0; j < m; j++) O[s3[cbuf[0][j]]++] = dbuf[0][j]; \
        } else { \
            if (vec) ctxs_gather16(cbuf[0], (uint16_t *)dbuf[0], m, s3, (const uint16_t_ua *)X, hot, nhot); \
            else for (Py_ssize_t j = 0; j < m; j++) dbuf[0][j] = X[s3[cbuf[0][j]]++]; \
            for (Py_ssize_t j = 0; j < m; j++) CTX_DEC(T, BITS, dbuf[0][j], Y[j0 + j], O[j0 + j]); \
        } \
    } \
} while (0)

/* four histograms of interleaved elements, so that repeated contexts make four chains of
 * increments the CPU overlaps, not one (sub: 4 * 2^w zeroed counters) */
#define CTX_HIST_T(T) do { const T##_ua *Y = (const T##_ua *)bs.buf; const T cm = (T)((1u << w) - 1); \
    uint32_t *h0 = sub, *h1 = sub + nc, *h2 = sub + 2 * nc, *h3 = sub + 3 * nc; Py_ssize_t i = 0; \
    for (Py_ssize_t i0 = 0; i0 < n; i0 = i) { \
        Py_ssize_t lim = n - i0 > ((Py_ssize_t)1 << 30) ? i0 + ((Py_ssize_t)1 << 30) : n; \
        for (; i + 4 <= lim; i += 4) { h0[(Y[i] >> s) & cm]++; h1[(Y[i + 1] >> s) & cm]++; \
                                       h2[(Y[i + 2] >> s) & cm]++; h3[(Y[i + 3] >> s) & cm]++; } \
        for (; i < lim; i++) h0[(Y[i] >> s) & cm]++; \
        for (int c = 0; c < nc; c++) { hist[c] += (uint64_t)h0[c] + h1[c] + h2[c] + h3[c]; \
                                       h0[c] = h1[c] = h2[c] = h3[c] = 0; } \
    } } while (0)

static void ctx_hist16_simd(const uint16_t_ua *Y, Py_ssize_t n, int s, int w, uint64_t *hist);
static int ctx_hist_c(Py_buffer bs, int isz, int s, int w, uint64_t *hist) {
    Py_ssize_t n = bs.len / isz; int nc = 1 << w;
#ifdef __x86_64__
    if (isz == 2 && w <= 8 && ctxm_simd == 1) { ctx_hist16_simd(bs.buf, n, s, w, hist); return 0; }
#endif
    uint32_t *sub = calloc(4 * (size_t)nc, sizeof(uint32_t));   /* (counts of at most 2^30 elements each) */
    if (!sub) return -1;
    switch (isz) {
        case 1: CTX_HIST_T(uint8_t); break;
        case 2: CTX_HIST_T(uint16_t); break;
        case 4: CTX_HIST_T(uint32_t); break;
        default: CTX_HIST_T(uint64_t); break;
    }
    free(sub);
    return 0;
}

/* ctx(x, base, out, itemsize, op, is_float, inverse, s, w, counts_out=None, offsets=None, row_bytes=0, digests=None,
 *     keep=None)
 * inverse 0: out = sorted stream of the deltas of x against base; inverse 1: x is the sorted
 * stream, out = the original elements. counts_out (uint64[2^w]) receives the base's histogram.
 * offsets (uint64[2^w]): the sorted positions of the first element of each context of this part
 * of a tensor (base and, encoding, x, or decoding, out are the part; the sorted side is the whole
 * stream); without it the part is the whole tensor. A position beyond the stream is an error.
 * Encoding, with row_bytes (the part starts a row), digests (uint64 per row of the part) gets the
 * XXH64 of each row of x, of the very bytes whose deltas were sorted, and keep (writable, x's
 * length; it may be base itself) a copy of them, each block once its base elements are read (as
 * ctxm's). */
static PyObject *ctx(PyObject *self, PyObject *args) {
    Py_buffer xs, bs, os; int isz, op, fl, inv, s, w; PyObject *cnt = Py_None, *offs = Py_None, *dgo = Py_None;
    PyObject *ko = Py_None;
    Py_ssize_t rb = 0;
    if (!PyArg_ParseTuple(args, "y*y*w*iiiiii|OOnOO", &xs, &bs, &os, &isz, &op, &fl, &inv, &s, &w, &cnt, &offs, &rb, &dgo,
                          &ko))
        return NULL;
    Py_buffer cb, ob, dg, ks; int have_cb = 0, have_ob = 0, have_dg = 0, have_k = 0;
    Py_ssize_t part = inv ? os.len : xs.len, whole = inv ? xs.len : os.len;
    int ok = (isz == 1 || isz == 2 || isz == 4 || isz == 8) && bs.len == part && part % isz == 0 && whole % isz == 0
             && op >= 0 && op <= 1 && w >= 1 && w <= CTX_MAXW && s >= 0 && s + w <= 8 * isz
             && (offs != Py_None || whole == part);
    if (ok && cnt != Py_None) {
        if (PyObject_GetBuffer(cnt, &cb, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) ok = -1;
        else { have_cb = 1; ok = cb.len >= (Py_ssize_t)(sizeof(uint64_t) << w); }
    }
    if (ok == 1 && offs != Py_None) {
        if (PyObject_GetBuffer(offs, &ob, PyBUF_C_CONTIGUOUS) < 0) ok = -1;
        else { have_ob = 1; ok = ob.len >= (Py_ssize_t)(sizeof(uint64_t) << w); }
    }
    if (ok == 1 && dgo != Py_None) {
        if (PyObject_GetBuffer(dgo, &dg, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) ok = -1;
        else have_dg = 1;
    }
    if (ok == 1 && ko != Py_None) {
        if (PyObject_GetBuffer(ko, &ks, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) ok = -1;
        else { have_k = 1; ok = !inv && ks.len == part; }
    }
    if (ok == 1) ok = rowhash_args_ok(rb, isz, part, have_dg ? &dg : NULL) && !(inv && have_dg);
    uint64_t *hist = NULL, *off = NULL, *sub = NULL; void *xlb = NULL;
    if (ok == 1) {
        hist = calloc((size_t)1 << w, sizeof(uint64_t)); off = malloc(sizeof(uint64_t) << w);
        sub = calloc((size_t)CTX_K << w, sizeof(uint64_t)); xlb = malloc(CTX_K * CTX_BLK * sizeof(uint64_t));
        if (!hist || !off || !sub || !xlb) ok = -2;
    }
    if (ok != 1) {
        free(hist); free(off); free(sub); free(xlb);
        if (have_cb) PyBuffer_Release(&cb);
        if (have_ob) PyBuffer_Release(&ob);
        if (have_dg) PyBuffer_Release(&dg);
        if (have_k) PyBuffer_Release(&ks);
        PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&os);
        if (ok == -2) return PyErr_NoMemory();
        if (ok == 0) PyErr_SetString(PyExc_ValueError, "bad arguments");
        return NULL;
    }
    Py_ssize_t n = part / isz, nsorted = whole / isz; int bad = 0;
    char *K = have_k ? (char *)ks.buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (have_ob) memcpy(off, ob.buf, sizeof(uint64_t) << w);
    switch (isz) {
        case 1: CTX_T(uint8_t, 8); break;
        case 2: CTX_T(uint16_t, 16); break;
        case 4: CTX_T(uint32_t, 32); break;
        default: CTX_T(uint64_t, 64); break;
    }
    if (have_cb) memcpy(cb.buf, hist, sizeof(uint64_t) << w);
    Py_END_ALLOW_THREADS
    free(hist); free(off); free(sub); free(xlb);
    if (have_cb) PyBuffer_Release(&cb);
    if (have_ob) PyBuffer_Release(&ob);
    if (have_dg) PyBuffer_Release(&dg);
    if (have_k) PyBuffer_Release(&ks);
    PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&os);
    if (bad) { PyErr_SetString(PyExc_ValueError, "context offsets beyond the sorted stream"); return NULL; }
    Py_RETURN_NONE;
}

/* ctx_hist(base, itemsize, s, w, counts_out): the histogram of contexts of base (uint64[2^w]) */
static PyObject *ctx_hist(PyObject *self, PyObject *args) {
    Py_buffer bs, cb; int isz, s, w;
    if (!PyArg_ParseTuple(args, "y*iiiw*", &bs, &isz, &s, &w, &cb)) return NULL;
    if ((isz != 1 && isz != 2 && isz != 4 && isz != 8) || bs.len % isz || w < 1 || w > CTX_MAXW || s < 0
            || s + w > 8 * isz || cb.len < (Py_ssize_t)(sizeof(uint64_t) << w)) {
        PyBuffer_Release(&bs); PyBuffer_Release(&cb);
        PyErr_SetString(PyExc_ValueError, "bad arguments"); return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    memset(cb.buf, 0, sizeof(uint64_t) << w);
    rc = ctx_hist_c(bs, isz, s, w, (uint64_t *)cb.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bs); PyBuffer_Release(&cb);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* unit_hist(src, itemsize, units, masked, hist_out, nnz_out): byte histograms of src cut into
 * consecutive units of elements (units: int64 element counts, summing to at most the elements of
 * src): hist_out (uint64[nunits][itemsize][256], zeroed here) counts byte k of each element of a
 * unit in [unit][k]; with masked, only nonzero elements are counted, and nnz_out (int64[nunits])
 * gets their number per unit. The delta planner's size model (deltaplan._units_cost) in one pass. */
static PyObject *unit_hist(PyObject *self, PyObject *args) {
    Py_buffer src, us, hs, zs; int isz, masked;
    if (!PyArg_ParseTuple(args, "y*iy*iw*w*", &src, &isz, &us, &masked, &hs, &zs)) return NULL;
    Py_ssize_t nu = us.len / (Py_ssize_t)sizeof(int64_t), n = isz > 0 ? src.len / isz : 0, tot = 0;
    int ok = (isz == 1 || isz == 2 || isz == 4 || isz == 8) && us.len % sizeof(int64_t) == 0
        && hs.len >= nu * isz * 256 * (Py_ssize_t)sizeof(uint64_t) && zs.len >= nu * (Py_ssize_t)sizeof(int64_t);
    /* the units are copied before they are checked: the outputs may overlap them, or another
     * thread change them, once the GIL is released */
    int64_t *U = ok ? malloc((size_t)(nu ? nu : 1) * sizeof(int64_t)) : NULL;
    if (U) memcpy(U, us.buf, (size_t)nu * sizeof(int64_t));
    for (Py_ssize_t u = 0; U && u < nu; u++) { if (U[u] < 0 || U[u] > n - tot) ok = 0; else tot += U[u]; }
    if (!ok || !U) {
        free(U);
        PyBuffer_Release(&src); PyBuffer_Release(&us); PyBuffer_Release(&hs); PyBuffer_Release(&zs);
        if (ok) return PyErr_NoMemory();
        PyErr_SetString(PyExc_ValueError, "bad arguments"); return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *S = src.buf; uint64_t *H = hs.buf; int64_t *Z = zs.buf;
    memset(H, 0, (size_t)nu * isz * 256 * sizeof(uint64_t));
    for (Py_ssize_t u = 0; u < nu; u++) {
        uint64_t *h = H + (size_t)u * isz * 256; int64_t nz = 0;
        for (int64_t i = 0; i < U[u]; i++, S += isz) {
            if (masked) { int any = 0; for (int k = 0; k < isz; k++) any |= S[k]; if (!any) continue; }
            nz++;
            for (int k = 0; k < isz; k++) h[k * 256 + S[k]]++;
        }
        Z[u] = nz;
    }
    Py_END_ALLOW_THREADS
    free(U);
    PyBuffer_Release(&src); PyBuffer_Release(&us); PyBuffer_Release(&hs); PyBuffer_Release(&zs);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------
 * Context-sorted masked deltas without the sorted stream (writers only: the same bytes as the
 * counting sort above followed by masked splits of the stream's segments, tested). ctxm moves a
 * part of a tensor: for each element it sets bit p of a bitmap over sorted positions (p: the
 * element's position in the sorted stream) when its delta is nonzero, and packs the nonzero deltas
 * of each (part, context) block from the block's first position: vals[start + j] is the j-th
 * nonzero delta of the block. A bitmap word wholly inside one block is stored; the words a block
 * shares with its neighbours (moved by other parts, maybe on other threads) are ORed atomically,
 * so the bitmap starts zeroed. encode_units kind 4 then cuts its units (segments of sorted
 * positions) from the bitmap and the packed values, with cum (the nonzero bits before each word)
 * to find where a block's values for a position start. The caller gives the part's histogram
 * (ctx_hist); every CTXM_CHECK elements each context's position is checked against its block's
 * end, so a base that changes under us (or a wrong histogram) is an error after at most
 * CTXM_CHECK elements past a block's end: the buffers hold CTXM_SLACK elements more. */
#define CTXM_CHECK 4096
#define CTXM_SLACK 4096

static int ctxm_hot(const uint64_t *C, int nc, Py_ssize_t n, unsigned *hot) {
    int nhot = 0;
    for (int c = 0; c < nc && nhot < CTXM_HOT; c++)
        if (C[c] && C[c] * CTXM_HOT_SHARE >= (uint64_t)n) hot[nhot++] = (unsigned)c;
    return nhot;
}

static inline void ctxm_flush(uint64_t *W, uint64_t wi, uint64_t v, uint64_t start) {
    if ((wi << 6) < start) __atomic_fetch_or(&W[wi], v, __ATOMIC_RELAXED);
    else W[wi] = v;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CTXM_HAVE_SIMD 1
static int ctxm_simd = -1;                /* -1: not yet probed; 0: off; 1: on (AVX-512 BW + VBMI2, BMI2) */

/* Groups of VL elements: each of the part's hot contexts (ctxm_hot, in zmm broadcasts) is compared
 * with every group without a branch, then the group's other contexts one by one. For a context: its elements' nonzero flags are appended to its bit accumulator
 * (pext) and its nonzero deltas compressed to its next value slots (a masked store: no byte
 * beyond them is written; with no element, nothing changes). */
#define CTXM_PUT(EP, MT, c, eq) do { \
    MT eq_ = (eq); unsigned c_ = (c); \
    int k = __builtin_popcount(eq_); uint64_t bits = PEXT(nz, eq_), p = pos[c_]; int r = (int)(p & 63); \
    uint64_t a = acc[c_] | (bits << r); \
    if (r + k >= 64) { ctxm_flush(W, p >> 6, a, bst[c_]); a = bits >> (64 - r); } \
    acc[c_] = a; pos[c_] = p + (uint64_t)k; \
    MT mm = eq_ & nz; int nv = __builtin_popcount(mm); \
    _mm512_mask_storeu_epi##EP(V + vp[c_], (MT)((1ull << nv) - 1), _mm512_maskz_compress_epi##EP(mm, dv)); \
    vp[c_] += (uint64_t)nv; } while (0)
#define CTXM_SIMD_BODY(T, VL, MT, EP) \
    __m512i hv[CTXM_HOT]; \
    for (int h = 0; h < nhot; h++) hv[h] = _mm512_set1_epi##EP(hot[h]); \
    for (Py_ssize_t j = 0; j < m; j += VL) { \
        Py_ssize_t left = m - j; MT rem = left >= VL ? (MT)~(MT)0 : (MT)(((MT)1 << left) - 1); \
        __m512i cv = _mm512_maskz_loadu_epi##EP(rem, cb + j), dv = _mm512_maskz_loadu_epi##EP(rem, db + j); \
        MT nz = _mm512_mask_test_epi##EP##_mask(rem, dv, dv), seen = 0; \
        for (int h = 0; h < nhot; h++) { \
            MT eq = _mm512_mask_cmpeq_epi##EP##_mask(rem, cv, hv[h]); \
            seen |= eq; CTXM_PUT(EP, MT, hot[h], eq); } \
        rem &= (MT)~seen; \
        while (rem) { \
            unsigned c = (unsigned)cb[j + __builtin_ctz(rem)]; \
            MT eq = _mm512_mask_cmpeq_epi##EP##_mask(rem, cv, _mm512_set1_epi##EP(c)); \
            rem &= (MT)~eq; CTXM_PUT(EP, MT, c, eq); } \
    }

/* 16-bit elements: groups of 64 in two vectors (the hot compares cost half as much per element) */
#define CTXM_PUT64(c, eq) do { \
    uint64_t eq_ = (eq); unsigned c_ = (c); \
    int k = __builtin_popcountll(eq_); uint64_t bits = _pext_u64(nz, eq_), p = pos[c_]; int r = (int)(p & 63); \
    uint64_t a = acc[c_] | (bits << r); \
    if (r + k >= 64) { ctxm_flush(W, p >> 6, a, bst[c_]); a = r ? bits >> (64 - r) : 0; } \
    acc[c_] = a; pos[c_] = p + (uint64_t)k; \
    uint64_t mm = eq_ & nz; \
    if (mm) { int n0 = __builtin_popcount((uint32_t)mm), n1 = __builtin_popcount((uint32_t)(mm >> 32)); \
    uint16_t *v_ = V + vp[c_]; \
    _mm512_mask_storeu_epi16(v_, (__mmask32)((1ull << n0) - 1), _mm512_maskz_compress_epi16((__mmask32)mm, d0)); \
    _mm512_mask_storeu_epi16(v_ + n0, (__mmask32)((1ull << n1) - 1), _mm512_maskz_compress_epi16((__mmask32)(mm >> 32), d1)); \
    vp[c_] += (uint64_t)(n0 + n1); } } while (0)

/* For each context of a group of 64 16-bit elements whose contexts are in c0 and c1 (lanes of
 * r0, r1; rem: the group's elements as a mask, seen = 0): PUT(context, its elements as a 64-bit
 * mask). The hot contexts (hv[h] = hot[h]) are compared with every group without a branch, the
 * group's other contexts found one by one (cx: room for 64 contexts). */
#define CTXM_CONTEXTS64(PUT) \
    for (int h = 0; h < nhot; h++) { \
        uint64_t eq = ((uint64_t)_mm512_mask_cmpeq_epi16_mask(r0, c0, hv[h]) \
                       | (uint64_t)_mm512_mask_cmpeq_epi16_mask(r1, c1, hv[h]) << 32); \
        seen |= eq; PUT(hot[h], eq); } \
    rem &= ~seen; \
    if (rem) { \
        _mm512_storeu_si512(cx, c0); _mm512_storeu_si512(cx + 32, c1); \
        while (rem) { \
            unsigned c = cx[__builtin_ctzll(rem)]; \
            __m512i b = _mm512_set1_epi16((short)c); \
            uint64_t eq = ((uint64_t)_mm512_mask_cmpeq_epi16_mask((__mmask32)rem, c0, b) \
                           | (uint64_t)_mm512_mask_cmpeq_epi16_mask((__mmask32)(rem >> 32), c1, b) << 32); \
            rem &= ~eq; PUT(c, eq); } \
    }

/* Groups of 64 16-bit elements (cb: their contexts; m of them): for each context present in a
 * group, PUT(context, its elements as a 64-bit mask); the part's hot contexts are compared with
 * every group without branches, the others found one by one. BEFORE and AFTER: statements run
 * before and after each group's contexts (j: the group's first element). */
#define CTXM_NOTHING
#define CTXM_GROUPS64(BEFORE, PUT, AFTER) \
    __m512i hv[CTXM_HOT]; \
    uint16_t cx[64]; \
    for (int h = 0; h < nhot; h++) hv[h] = _mm512_set1_epi16((short)hot[h]); \
    for (Py_ssize_t j = 0; j < m; j += 64) { \
        Py_ssize_t left = m - j; \
        uint64_t rem = left >= 64 ? ~0ull : ((1ull << left) - 1), seen = 0; \
        __mmask32 r0 = (__mmask32)rem, r1 = (__mmask32)(rem >> 32); \
        __m512i c0 = _mm512_maskz_loadu_epi16(r0, cb + j), c1 = _mm512_maskz_loadu_epi16(r1, cb + j + 32); \
        BEFORE \
        CTXM_CONTEXTS64(PUT) \
        AFTER \
    }
/* ctxm_block16's and ctxi_block16's common parts: the constants (zigzag's sign bit and float
 * mask, the context mask and shift, the hot contexts), and a group's head: its elements as a mask
 * (rem; r0, r1 for the two halves), its base elements (y0, y1) and their contexts (c0, c1). */
#define CTXB16_SETUP \
    const __m512i sbv = _mm512_set1_epi16((short)0x8000), fmv = _mm512_set1_epi16(fl ? -1 : 0); \
    const __m512i cmv = _mm512_set1_epi16((short)((1u << w) - 1)); \
    const __m128i sv = _mm_cvtsi32_si128(s); \
    uint16_t cx[64]; \
    __m512i hv[CTXM_HOT]; \
    for (int h = 0; h < nhot; h++) hv[h] = _mm512_set1_epi16((short)hot[h]);
#define CTXB16_GROUP \
    Py_ssize_t left = m - j; \
    uint64_t rem = left >= 64 ? ~0ull : ((1ull << left) - 1), seen = 0; \
    __mmask32 r0 = (__mmask32)rem, r1 = (__mmask32)(rem >> 32); \
    __m512i y0 = _mm512_maskz_loadu_epi16(r0, (const void *)(Y + j)), y1 = _mm512_maskz_loadu_epi16(r1, (const void *)(Y + j + 32)); \
    __m512i c0 = _mm512_and_si512(_mm512_srl_epi16(y0, sv), cmv), c1 = _mm512_and_si512(_mm512_srl_epi16(y1, sv), cmv);

/* The move of ctxm for 16-bit elements, a block of m: groups of 64 elements, their contexts and
 * deltas made in registers from the elements (X; each loaded once, and stored to xl for the row
 * digests) and their base (Y): CTX_ENC and (y >> s) & cm lane by lane, the same values. Each hot context is compared with every group
 * without a branch (CTXM_PUT64 stores values only for a context with a nonzero delta in the group:
 * sparse deltas skip most stores); the group's other contexts one by one. */
#define CTXM_ENC16(xv, yv, dv) do { __m512i x_ = (xv), y_ = (yv); \
    if (op == 0) dv = _mm512_xor_si512(x_, y_); else { \
        x_ = _mm512_xor_si512(x_, _mm512_and_si512(_mm512_or_si512(_mm512_srai_epi16(x_, 15), sbv), fmv)); \
        y_ = _mm512_xor_si512(y_, _mm512_and_si512(_mm512_or_si512(_mm512_srai_epi16(y_, 15), sbv), fmv)); \
        __m512i v_ = _mm512_sub_epi16(x_, y_); \
        dv = _mm512_xor_si512(_mm512_slli_epi16(v_, 1), _mm512_srai_epi16(v_, 15)); } } while (0)
__attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt")))
static void ctxm_block16(const uint16_t_ua *X, uint16_t *xl, const uint16_t_ua *Y, Py_ssize_t m, int op, int fl, int s, int w,
                         uint64_t *pos, uint64_t *vp, uint64_t *acc, const uint64_t *bst, uint64_t *W, uint16_t *V,
                         const unsigned *hot, int nhot) {
    CTXB16_SETUP
    for (Py_ssize_t j = 0; j < m; j += 64) {
        CTXB16_GROUP
        __m512i x0 = _mm512_maskz_loadu_epi16(r0, (const void *)(X + j)), x1 = _mm512_maskz_loadu_epi16(r1, (const void *)(X + j + 32));
        _mm512_mask_storeu_epi16(xl + j, r0, x0); _mm512_mask_storeu_epi16(xl + j + 32, r1, x1);
        __m512i d0, d1;
        CTXM_ENC16(x0, y0, d0); CTXM_ENC16(x1, y1, d1);
        uint64_t nz = ((uint64_t)_mm512_mask_test_epi16_mask(r0, d0, d0)
                       | (uint64_t)_mm512_mask_test_epi16_mask(r1, d1, d1) << 32);
        CTXM_CONTEXTS64(CTXM_PUT64)
    }
}

#define PEXT _pext_u32
__attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt")))
static void ctxm_group32(const uint32_t *cb, const uint32_t *db, Py_ssize_t m, uint64_t *pos, uint64_t *vp,
                         uint64_t *acc, const uint64_t *bst, uint64_t *W, uint32_t *V, const unsigned *hot, int nhot) {
    CTXM_SIMD_BODY(uint32_t, 16, __mmask16, 32)
}
#undef PEXT

/* CTX_T's vector moves (the sorted stream of a bytegroup or raw context-sorted delta): for each
 * context of a group, its deltas compressed to O at the context's next positions (a masked store:
 * nothing beyond them is written), or, inverse, its stream positions loaded (a masked load: nothing
 * beyond them is read) and expanded into its elements' places. The same positions as the scalar
 * moves, so the same bytes. */
#define CTXS_LOAD64 __m512i d0 = _mm512_maskz_loadu_epi16(r0, db + j), d1 = _mm512_maskz_loadu_epi16(r1, db + j + 32);
#define CTXS_PUT64(c, eq) do { \
    uint64_t eq_ = (eq); unsigned c_ = (c); \
    int n0 = __builtin_popcount((uint32_t)eq_), n1 = __builtin_popcount((uint32_t)(eq_ >> 32)); \
    uint16_t_ua *o_ = O + pos[c_]; \
    _mm512_mask_storeu_epi16(o_, (__mmask32)((1ull << n0) - 1), _mm512_maskz_compress_epi16((__mmask32)eq_, d0)); \
    _mm512_mask_storeu_epi16(o_ + n0, (__mmask32)((1ull << n1) - 1), _mm512_maskz_compress_epi16((__mmask32)(eq_ >> 32), d1)); \
    pos[c_] += (uint64_t)(n0 + n1); } while (0)
#define CTXS_ZERO64 __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
#define CTXS_STORE64 _mm512_mask_storeu_epi16(db + j, r0, a0); _mm512_mask_storeu_epi16(db + j + 32, r1, a1);
#define CTXS_GET64(c, eq) do { \
    uint64_t eq_ = (eq); unsigned c_ = (c); \
    int n0 = __builtin_popcount((uint32_t)eq_), n1 = __builtin_popcount((uint32_t)(eq_ >> 32)); \
    const uint16_t_ua *x_ = X + pos[c_]; \
    a0 = _mm512_mask_expand_epi16(a0, (__mmask32)eq_, _mm512_maskz_loadu_epi16((__mmask32)((1ull << n0) - 1), x_)); \
    a1 = _mm512_mask_expand_epi16(a1, (__mmask32)(eq_ >> 32), _mm512_maskz_loadu_epi16((__mmask32)((1ull << n1) - 1), x_ + n0)); \
    pos[c_] += (uint64_t)(n0 + n1); } while (0)
__attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt")))
static void ctxs_move16(const uint16_t *cb, const uint16_t *db, Py_ssize_t m, uint64_t *pos, uint16_t_ua *O,
                        const unsigned *hot, int nhot) {
    CTXM_GROUPS64(CTXS_LOAD64, CTXS_PUT64, CTXM_NOTHING)
}
__attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi2,popcnt")))
static void ctxs_gather16(const uint16_t *cb, uint16_t *db, Py_ssize_t m, uint64_t *pos, const uint16_t_ua *X,
                          const unsigned *hot, int nhot) {
    CTXM_GROUPS64(CTXS_ZERO64, CTXS_GET64, CTXS_STORE64)
}

/* The context histogram of 16-bit elements with contexts of at most 8 bits (ctx_hist_c's), 64
 * elements at a time: contexts packed to bytes (in an order of their own: a histogram does not
 * care), compared with each hot context (1/128 of a sample of the first elements or more, up to
 * CTXM_HOT), the matches counted; the others one by one. The same counts. */
__attribute__((target("avx512f,avx512bw,popcnt")))
static void ctx_hist16_simd(const uint16_t_ua *Y, Py_ssize_t n, int s, int w, uint64_t *hist) {
    const unsigned cm = (1u << w) - 1;
    Py_ssize_t ns = n < 4096 ? n : 4096;
    for (Py_ssize_t i = 0; i < ns; i++) hist[(Y[i] >> s) & cm]++;
    unsigned hot[CTXM_HOT]; int nhot = ctxm_hot(hist, 1 << w, ns, hot);
    uint64_t cnt[CTXM_HOT] = {0};
    __m512i hv[CTXM_HOT];
    for (int h = 0; h < nhot; h++) hv[h] = _mm512_set1_epi8((char)hot[h]);
    const __m512i cmv = _mm512_set1_epi16((short)cm);
    const __m128i sv = _mm_cvtsi32_si128(s);
    uint8_t cb[64];
    Py_ssize_t i = ns;
    for (; i + 64 <= n; i += 64) {
        __m512i c0 = _mm512_and_si512(_mm512_srl_epi16(_mm512_loadu_si512((const void *)(Y + i)), sv), cmv);
        __m512i c1 = _mm512_and_si512(_mm512_srl_epi16(_mm512_loadu_si512((const void *)(Y + i + 32)), sv), cmv);
        __m512i cv = _mm512_packus_epi16(c0, c1);
        uint64_t rem = hot_count64(cv, hv, nhot, cnt);
        if (rem) {
            _mm512_storeu_si512(cb, cv);
            do { hist[cb[__builtin_ctzll(rem)]]++; rem &= rem - 1; } while (rem);
        }
    }
    for (; i < n; i++) hist[(Y[i] >> s) & cm]++;
    for (int h = 0; h < nhot; h++) hist[hot[h]] += cnt[h];
}

static void ctxm_simd_init(void) {
    __builtin_cpu_init();
    ctxm_simd = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi2")
                && __builtin_cpu_supports("bmi2") ? 1 : 0;
}
#else
static int ctxm_simd = 0;
static void ctxm_simd_init(void) {}
static void ctx_hist16_simd(const uint16_t_ua *Y, Py_ssize_t n, int s, int w, uint64_t *hist) {}
static void ctxs_move16(const uint16_t *cb, const uint16_t *db, Py_ssize_t m, uint64_t *pos, uint16_t_ua *O,
                        const unsigned *hot, int nhot) {}
static void ctxs_gather16(const uint16_t *cb, uint16_t *db, Py_ssize_t m, uint64_t *pos, const uint16_t_ua *X,
                          const unsigned *hot, int nhot) {}
#endif

static PyObject *py_ctxm_simd(PyObject *self, PyObject *args) {
    int flag = -1;
    if (!PyArg_ParseTuple(args, "|i", &flag)) return NULL;
#ifdef CTXM_HAVE_SIMD
    if (flag == 0) ctxm_simd = 0;
    else if (flag == 1) ctxm_simd_init();
#endif
    return PyLong_FromLong(ctxm_simd);
}

/* the scalar move of a group (any width); contexts in cb, deltas in db */
#define CTXM_SCALAR(T) \
    for (Py_ssize_t j = 0; j < m; j++) { unsigned c = cb[j]; T d = db[j]; uint64_t p = pos[c]; \
        acc[c] |= (uint64_t)(d != 0) << (p & 63); \
        if ((p & 63) == 63) { ctxm_flush(W, p >> 6, acc[c], bst[c]); acc[c] = 0; } \
        pos[c] = p + 1; uint64_t v = vp[c]; V[v] = d; vp[c] = v + (d != 0); }

/* Groups of CTX_BLK elements: contexts (in the delta's width, for the vector compares) and deltas
 * first, in loops the compiler vectorises, then the move. */
#define CTXM_T(T, BITS, GROUP) do { \
    const T##_ua *X = (const T##_ua *)xs.buf, *Y = (const T##_ua *)bs.buf; T##_ua *V = (T##_ua *)vs.buf; \
    const T sb = (T)1 << (BITS - 1); const T cm = (T)((1u << w) - 1); const T fm = fl ? (T)~(T)0 : (T)0; \
    T cb[CTX_BLK], db[CTX_BLK], xl[CTX_BLK]; \
    for (Py_ssize_t j0 = 0; j0 < n && !bad; j0 += CTX_BLK) { \
        Py_ssize_t m = n - j0 < CTX_BLK ? n - j0 : CTX_BLK; \
        memcpy(xl, (const void *)(X + j0), (size_t)m * sizeof(T)); /* read once: the deltas and the digests */ \
        rowhash_feed(&rh, xl, (size_t)m * sizeof(T)); \
        for (Py_ssize_t j = 0; j < m; j++) { T y = Y[j0 + j]; cb[j] = (T)((y >> s) & cm); } \
        for (Py_ssize_t j = 0; j < m; j++) CTX_ENC(T, BITS, xl[j], Y[j0 + j], db[j]); \
        if (K) memcpy(K + j0 * (Py_ssize_t)sizeof(T), xl, (size_t)m * sizeof(T)); /* after its base is read */ \
        GROUP; \
        if ((j0 + m) % CTXM_CHECK == 0 || j0 + m == n) \
            for (int c = 0; c < nc; c++) bad |= pos[c] > end[c]; \
    } \
} while (0)

/* ctxm's and ctxm_inverse's common checks: widths, the tables' sizes and alignment, and counts
 * (uint64[2^w], adding up to the part's n elements) and offsets that keep every block inside the
 * nsorted positions */
static int ctxm_args_ok(int isz, int op, int s, int w, Py_ssize_t nsorted, Py_ssize_t plen, const Py_buffer *W,
                        const Py_buffer *V, const Py_buffer *ob, const Py_buffer *cbf, const void *a, const void *b) {
    if (nsorted < 0 || nsorted > PY_SSIZE_T_MAX / 16 - CTXM_SLACK) return 0;      /* (no overflow below) */
    if (!((isz == 1 || isz == 2 || isz == 4 || isz == 8) && plen % isz == 0 && op >= 0 && op <= 1 && w >= 1
          && w <= CTX_MAXW && s >= 0 && s + w <= 8 * isz && nsorted >= 0
          && W->len / 8 >= (nsorted + CTXM_SLACK) / 64 + 2 && V->len / isz >= nsorted + CTXM_SLACK
          && ob->len >= (Py_ssize_t)(sizeof(uint64_t) << w) && cbf->len >= (Py_ssize_t)(sizeof(uint64_t) << w)
          && (uintptr_t)W->buf % 8 == 0 && (uintptr_t)V->buf % isz == 0 && (uintptr_t)a % isz == 0
          && (uintptr_t)b % isz == 0 && (uintptr_t)ob->buf % 8 == 0 && (uintptr_t)cbf->buf % 8 == 0)) return 0;
    const uint64_t *O = ob->buf, *C = cbf->buf; uint64_t tot = 0;
    for (int c = 0; c < 1 << w; c++) {
        if (C[c] > (uint64_t)nsorted || O[c] > (uint64_t)nsorted - C[c]) return 0;
        tot += C[c];
    }
    return tot == (uint64_t)(plen / isz);
}

/* ctxm(x, base, bitmap, vals, itemsize, op, is_float, s, w, nsorted, offsets, counts, row_bytes=0, digests=None,
 *      keep=None)
 * Moves the part (x, base: its elements in natural order) as above: offsets (uint64[2^w]) its
 * first sorted position per context, counts (uint64[2^w]) its elements per context; bitmap
 * (uint64 words, zeroed) and vals (elements) cover nsorted positions plus CTXM_SLACK. With
 * row_bytes (a multiple of itemsize; the part starts a row), digests (uint64 per row of the part)
 * gets the XXH64 of each row of x, of the very bytes whose deltas were moved. With keep (writable,
 * x's length; it may be base itself), keep gets those very bytes too, each block once its base
 * elements are read: a Checkpointer's copy of the base becomes the copy of what was coded. */
static PyObject *ctxm(PyObject *self, PyObject *args) {
    Py_buffer xs, bs, Ws, vs, ob, cbf, dg, ks; int isz, op, fl, s, w; Py_ssize_t nsorted, rb = 0;
    PyObject *dgo = Py_None, *ko = Py_None;
    if (!PyArg_ParseTuple(args, "y*y*w*w*iiiiiny*y*|nOO", &xs, &bs, &Ws, &vs, &isz, &op, &fl, &s, &w, &nsorted, &ob, &cbf,
                          &rb, &dgo, &ko))
        return NULL;
    int have_dg = 0, have_k = 0;
    if (dgo != Py_None) {
        if (PyObject_GetBuffer(dgo, &dg, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&Ws); PyBuffer_Release(&vs);
            PyBuffer_Release(&ob); PyBuffer_Release(&cbf);
            return NULL;
        }
        have_dg = 1;
    }
    if (ko != Py_None) {
        if (PyObject_GetBuffer(ko, &ks, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&Ws); PyBuffer_Release(&vs);
            PyBuffer_Release(&ob); PyBuffer_Release(&cbf);
            if (have_dg) PyBuffer_Release(&dg);
            return NULL;
        }
        have_k = 1;
    }
    char *K = have_k ? (char *)ks.buf : NULL;
    int ok = xs.len == bs.len && ctxm_args_ok(isz, op, s, w, nsorted, xs.len, &Ws, &vs, &ob, &cbf, xs.buf, bs.buf)
             && rowhash_args_ok(rb, isz, xs.len, have_dg ? &dg : NULL) && (!have_k || ks.len == xs.len);
    Py_ssize_t n = ok ? xs.len / isz : 0; int nc = ok ? 1 << w : 0;
    uint64_t *st = NULL;
    if (ok && !(st = malloc(5 * sizeof(uint64_t) << w))) ok = -1;
    if (ok != 1) {
        PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&Ws); PyBuffer_Release(&vs);
        PyBuffer_Release(&ob); PyBuffer_Release(&cbf);
        if (have_dg) PyBuffer_Release(&dg);
        if (have_k) PyBuffer_Release(&ks);
        if (ok < 0) return PyErr_NoMemory();
        PyErr_SetString(PyExc_ValueError, "bad arguments"); return NULL;
    }
    int bad = 0, simd = ctxm_simd == 1;
    Py_BEGIN_ALLOW_THREADS
    uint64_t *pos = st, *vp = st + nc, *acc = st + 2 * (size_t)nc, *bst = st + 3 * (size_t)nc, *end = st + 4 * (size_t)nc;
    uint64_t *W = Ws.buf;
    for (int c = 0; c < nc; c++) {
        pos[c] = vp[c] = bst[c] = ((const uint64_t *)ob.buf)[c]; acc[c] = 0;
        end[c] = bst[c] + ((const uint64_t *)cbf.buf)[c];
    }
    unsigned hot[CTXM_HOT]; int nhot = ctxm_hot(cbf.buf, nc, n, hot);
    rowhash rh;
    rowhash_init(&rh, have_dg ? (uint64_t)rb : 0, (uint64_t)xs.len, have_dg ? dg.buf : NULL, have_dg ? dg.len / 8 : 0);
    switch (isz) {
        case 1: CTXM_T(uint8_t, 8, CTXM_SCALAR(uint8_t)); break;
#ifdef CTXM_HAVE_SIMD
        case 2:
            if (simd) {                   /* contexts and deltas made in registers, not in cb and db */
                const uint16_t_ua *X = (const uint16_t_ua *)xs.buf, *Y = (const uint16_t_ua *)bs.buf;
                uint16_t xl[CTX_BLK];
                for (Py_ssize_t j0 = 0; j0 < n && !bad; j0 += CTX_BLK) {
                    Py_ssize_t m = n - j0 < CTX_BLK ? n - j0 : CTX_BLK;
                    /* each element read once, into a register: its delta is moved and it goes to xl, */
                    ctxm_block16(X + j0, xl, Y + j0, m, op, fl, s, w, pos, vp, acc, bst, W, (uint16_t *)vs.buf, hot, nhot);
                    rowhash_feed(&rh, xl, (size_t)m * 2);          /* whose bytes the digests are taken of */
                    if (K) memcpy(K + 2 * j0, xl, (size_t)m * 2);  /* and keep gets */
                    if ((j0 + m) % CTXM_CHECK == 0 || j0 + m == n)
                        for (int c = 0; c < nc; c++) bad |= pos[c] > end[c];
                }
            } else CTXM_T(uint16_t, 16, CTXM_SCALAR(uint16_t));
            break;
        case 4: CTXM_T(uint32_t, 32, if (simd) ctxm_group32(cb, db, m, pos, vp, acc, bst, W, V, hot, nhot); else { CTXM_SCALAR(uint32_t) }); break;
#else
        case 2: CTXM_T(uint16_t, 16, CTXM_SCALAR(uint16_t)); break;
        case 4: CTXM_T(uint32_t, 32, CTXM_SCALAR(uint32_t)); break;
#endif
        default: CTXM_T(uint64_t, 64, CTXM_SCALAR(uint64_t)); break;
    }
    if (!bad)
        for (int c = 0; c < nc; c++) {
            bad |= pos[c] != end[c];
            if (acc[c]) __atomic_fetch_or(&W[pos[c] >> 6], acc[c], __ATOMIC_RELAXED);
        }
    Py_END_ALLOW_THREADS
    free(st);
    PyBuffer_Release(&xs); PyBuffer_Release(&bs); PyBuffer_Release(&Ws); PyBuffer_Release(&vs);
    PyBuffer_Release(&ob); PyBuffer_Release(&cbf);
    if (have_dg) PyBuffer_Release(&dg);
    if (have_k) PyBuffer_Release(&ks);
    if (bad) { PyErr_SetString(PyExc_ValueError, "the base's contexts do not match their counts (did the base change?)"); return NULL; }
    Py_RETURN_NONE;
}

/* ctxm_cum(bitmap, nsorted, cum): cum[k] = the set bits of words 0..k-1, k = 0 .. nsorted / 64 + 1 */
static PyObject *ctxm_cum(PyObject *self, PyObject *args) {
    Py_buffer Ws, cs; Py_ssize_t nsorted;
    if (!PyArg_ParseTuple(args, "y*nw*", &Ws, &nsorted, &cs)) return NULL;
    Py_ssize_t nw = nsorted / 64 + 1;
    if (nsorted < 0 || Ws.len / 8 < nw || cs.len / 8 < nw + 1 || (uintptr_t)Ws.buf % 8 || (uintptr_t)cs.buf % 8) {
        PyBuffer_Release(&Ws); PyBuffer_Release(&cs);
        PyErr_SetString(PyExc_ValueError, "bad arguments"); return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint64_t *W = Ws.buf; uint64_t *C = cs.buf, t = 0;
    for (Py_ssize_t k = 0; k < nw; k++) { C[k] = t; t += (uint64_t)__builtin_popcountll(W[k]); }
    C[nw] = t;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&Ws); PyBuffer_Release(&cs);
    Py_RETURN_NONE;
}

/* nonzero bits of sorted positions [0, q) */
static inline uint64_t ctxm_before(const uint64_t *W, const uint64_t *cum, uint64_t q) {
    uint64_t r = q & 63;
    return cum[q >> 6] + (r ? (uint64_t)__builtin_popcountll(W[q >> 6] & ((1ull << r) - 1)) : 0);
}

/* One unit of kind 4: sorted positions [a, b): its bitmap into m, its nonzero deltas' bytes into
 * the planes pb; returns the nonzero count, or -1 where cum does not agree with the bitmap (every
 * value read stays inside its block whatever cum holds). blk: the ascending first positions of the nonempty
 * blocks, then nsorted (nblk + 1 entries, checked by enc_parse). */
static Py_ssize_t ctxm_unit(const uint64_t *W, const uint64_t *cum, const uint64_t *blk, Py_ssize_t nblk,
                            const uint8_t *V, int isz, uint64_t a, uint64_t b, uint8_t *m, uint8_t **pb) {
    uint64_t n = b - a, nb = (n + 7) / 8;
    for (uint64_t i = 0; i < nb; i += 8) {
        uint64_t q = a + 8 * i, wi = q >> 6; int r = (int)(q & 63);
        uint64_t v = W[wi] >> r;
        if (r) v |= W[wi + 1] << (64 - r);
        uint64_t t = nb - i < 8 ? nb - i : 8;
        memcpy(m + i, &v, t);
    }
    if (n & 7) m[nb - 1] &= (uint8_t)((1u << (n & 7)) - 1);
    Py_ssize_t lo = 0, hi = nblk - 1;               /* the last block starting at or before a */
    while (lo < hi) { Py_ssize_t mid = (lo + hi + 1) / 2; if (blk[mid] <= a) lo = mid; else hi = mid - 1; }
    Py_ssize_t nnz = 0;
    for (Py_ssize_t i = lo; i < nblk && blk[i] < b; i++) {
        uint64_t u = a > blk[i] ? a : blk[i], v = b < blk[i + 1] ? b : blk[i + 1];
        if (u >= v) continue;
        uint64_t b0 = ctxm_before(W, cum, blk[i]), bu = ctxm_before(W, cum, u), bv = ctxm_before(W, cum, v);
        if (bu < b0 || bu - b0 > u - blk[i] || bv < bu || bv - bu > v - u) return -1;    /* cum lies */
        uint64_t cnt = bv - bu;
        const uint8_t *src = V + (blk[i] + (bu - b0)) * (uint64_t)isz;
        if (isz == 1) memcpy(pb[0] + nnz, src, cnt);
        else if (isz == 2) { uint8_t *p0 = pb[0] + nnz, *p1 = pb[1] + nnz;
            for (uint64_t j = 0; j < cnt; j++) { p0[j] = src[2 * j]; p1[j] = src[2 * j + 1]; } }
        else for (uint64_t j = 0; j < cnt; j++) for (int k = 0; k < isz; k++) pb[k][nnz + j] = src[j * isz + k];
        nnz += (Py_ssize_t)cnt;
    }
    return nnz;
}

/* The reader's counterpart (ctxm_inverse): a part of a tensor rebuilt from the bitmap over sorted
 * positions and the packed nonzero deltas (decode_units kind 4 puts each masked segment there),
 * without the sorted stream. Element i of context c takes sorted position p = pos[c]++; its delta
 * is the next packed value of its context when bit p is set, else 0; vals index of a context's
 * first value in the part: the set bits before its first position (cum). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CTXI_PUT64(c, eq) do { \
    uint64_t eq_ = (eq); unsigned c_ = (c); \
    int k = __builtin_popcountll(eq_); uint64_t p = pos[c_], wi = p >> 6; int r = (int)(p & 63); \
    uint64_t win = _bzhi_u64((W[wi] >> r) | ((W[wi + 1] << 1) << (63 - r)), (unsigned)k); \
    uint64_t nzm = _pdep_u64(win, eq_); int n0 = __builtin_popcount((uint32_t)nzm); \
    const uint16_t *v_ = V + vp[c_]; \
    a0 = _mm512_or_si512(a0, _mm512_maskz_expand_epi16((__mmask32)nzm, _mm512_loadu_si512(v_))); \
    a1 = _mm512_or_si512(a1, _mm512_maskz_expand_epi16((__mmask32)(nzm >> 32), _mm512_loadu_si512(v_ + n0))); \
    vp[c_] += (uint64_t)__builtin_popcountll(win); pos[c_] = p + (uint64_t)k; } while (0)

/* groups of 64 16-bit elements: each context's bits for the group read as one window, deposited
 * at its elements (pdep), its values expanded into them */
#define CTXI_ZERO __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();

/* ctxm_inverse's move for 16-bit elements, a block of m, in groups of 64: the contexts made in
 * registers from the base (Y), each context's deltas deposited (CTXI_PUT64), CTX_DEC done in
 * registers too and the elements stored to O (which may be Y itself: each group of Y is read
 * before its O is written). The same values as CTXI_T with CTXI_SCALAR. */
__attribute__((target("avx512f,avx512bw,avx512vbmi2,bmi,bmi2,popcnt")))
static void ctxi_block16(const uint16_t_ua *Y, uint16_t_ua *O, Py_ssize_t m, int op, int fl, int s, int w,
                         uint64_t *pos, uint64_t *vp, const uint64_t *W, const uint16_t *V, const unsigned *hot, int nhot) {
    const __m512i one = _mm512_set1_epi16(1);
    CTXB16_SETUP
    for (Py_ssize_t j = 0; j < m; j += 64) {
        CTXB16_GROUP
        CTXI_ZERO
        CTXM_CONTEXTS64(CTXI_PUT64)
        __m512i o0, o1;
        if (op == 0) { o0 = _mm512_xor_si512(a0, y0); o1 = _mm512_xor_si512(a1, y1); }
        else {
#define CTXI_DEC16(z, y, o) do { \
            __m512i b_ = _mm512_xor_si512(y, _mm512_and_si512(_mm512_or_si512(_mm512_srai_epi16(y, 15), sbv), fmv)); \
            __m512i k_ = _mm512_add_epi16(b_, _mm512_xor_si512(_mm512_srli_epi16(z, 1), \
                                                               _mm512_sub_epi16(_mm512_setzero_si512(), _mm512_and_si512(z, one)))); \
            o = _mm512_xor_si512(k_, _mm512_and_si512(_mm512_or_si512(_mm512_sub_epi16(_mm512_srli_epi16(k_, 15), one), sbv), fmv)); \
        } while (0)
            CTXI_DEC16(a0, y0, o0); CTXI_DEC16(a1, y1, o1);
#undef CTXI_DEC16
        }
        _mm512_mask_storeu_epi16((void *)(O + j), r0, o0); _mm512_mask_storeu_epi16((void *)(O + j + 32), r1, o1);
    }
}
#define CTXI_HAVE_SIMD 1
#endif

#define CTXI_SCALAR(T) \
    for (Py_ssize_t j = 0; j < m; j++) { unsigned c = cb[j]; uint64_t p = pos[c], v = vp[c]; \
        T bit = (T)((W[p >> 6] >> (p & 63)) & 1); \
        db[j] = (T)(V[v] & (T)(0 - bit)); vp[c] = v + bit; pos[c] = p + 1; }

#define CTXI_T(T, BITS, GROUP) do { \
    const T##_ua *Y = (const T##_ua *)bs.buf; T##_ua *O = (T##_ua *)os.buf; const T##_ua *V = (const T##_ua *)vs.buf; \
    const T sb = (T)1 << (BITS - 1); const T cm = (T)((1u << w) - 1); const T fm = fl ? (T)~(T)0 : (T)0; \
    T cb[CTX_BLK], db[CTX_BLK]; \
    for (Py_ssize_t j0 = 0; j0 < n && !bad; j0 += CTX_BLK) { \
        Py_ssize_t m = n - j0 < CTX_BLK ? n - j0 : CTX_BLK; \
        for (Py_ssize_t j = 0; j < m; j++) { T y = Y[j0 + j]; cb[j] = (T)((y >> s) & cm); } \
        GROUP; \
        for (Py_ssize_t j = 0; j < m; j++) CTX_DEC(T, BITS, db[j], Y[j0 + j], O[j0 + j]); \
        if ((j0 + m) % CTXM_CHECK == 0 || j0 + m == n) \
            for (int c = 0; c < nc; c++) bad |= pos[c] > end[c]; \
    } \
} while (0)

/* ctxm_inverse(base, out, bitmap, vals, cum, itemsize, op, is_float, s, w, nsorted, offsets, counts)
 * The part (base, out: its elements in natural order; offsets and counts as for ctxm) rebuilt
 * from bitmap and vals (covering nsorted positions, plus CTXM_SLACK) and cum (ctxm_cum's). */
static PyObject *ctxm_inverse(PyObject *self, PyObject *args) {
    Py_buffer bs, os, Ws, vs, cs, ob, cbf; int isz, op, fl, s, w; Py_ssize_t nsorted;
    if (!PyArg_ParseTuple(args, "y*w*y*y*y*iiiiiny*y*", &bs, &os, &Ws, &vs, &cs, &isz, &op, &fl, &s, &w, &nsorted, &ob, &cbf))
        return NULL;
    int ok = os.len == bs.len && cs.len / 8 >= nsorted / 64 + 2 && (uintptr_t)cs.buf % 8 == 0
             && ctxm_args_ok(isz, op, s, w, nsorted, bs.len, &Ws, &vs, &ob, &cbf, bs.buf, os.buf);
    Py_ssize_t n = ok ? bs.len / isz : 0; int nc = ok ? 1 << w : 0;
    uint64_t *st = NULL;
    if (ok && !(st = malloc(3 * sizeof(uint64_t) << w))) ok = -1;
    if (ok != 1) {
        PyBuffer_Release(&bs); PyBuffer_Release(&os); PyBuffer_Release(&Ws); PyBuffer_Release(&vs);
        PyBuffer_Release(&cs); PyBuffer_Release(&ob); PyBuffer_Release(&cbf);
        if (ok < 0) return PyErr_NoMemory();
        PyErr_SetString(PyExc_ValueError, "bad arguments"); return NULL;
    }
    int bad = 0, simd = ctxm_simd == 1;
    Py_BEGIN_ALLOW_THREADS
    uint64_t *pos = st, *vp = st + nc, *end = st + 2 * (size_t)nc;
    const uint64_t *W = Ws.buf, *cum = cs.buf, *C = cbf.buf;
    for (int c = 0; c < nc; c++) {
        pos[c] = ((const uint64_t *)ob.buf)[c]; end[c] = pos[c] + C[c];
        vp[c] = C[c] ? ctxm_before(W, cum, pos[c]) : 0;
        bad |= vp[c] > pos[c];          /* a cum that lies: values are then never read past the tables */
    }
    unsigned hot[CTXM_HOT]; int nhot = ctxm_hot(C, nc, n, hot);
    (void)hot; (void)nhot; (void)simd;
    switch (isz) {
        case 1: CTXI_T(uint8_t, 8, CTXI_SCALAR(uint8_t)); break;
#ifdef CTXI_HAVE_SIMD
        case 2:
            if (simd) {                   /* contexts and elements made in registers */
                const uint16_t_ua *Y = (const uint16_t_ua *)bs.buf; uint16_t_ua *O = (uint16_t_ua *)os.buf;
                for (Py_ssize_t j0 = 0; j0 < n && !bad; j0 += CTX_BLK) {
                    Py_ssize_t m = n - j0 < CTX_BLK ? n - j0 : CTX_BLK;
                    ctxi_block16(Y + j0, O + j0, m, op, fl, s, w, pos, vp, W, (const uint16_t *)vs.buf, hot, nhot);
                    if ((j0 + m) % CTXM_CHECK == 0 || j0 + m == n)
                        for (int c = 0; c < nc; c++) bad |= pos[c] > end[c];
                }
            } else CTXI_T(uint16_t, 16, CTXI_SCALAR(uint16_t));
            break;
#else
        case 2: CTXI_T(uint16_t, 16, CTXI_SCALAR(uint16_t)); break;
#endif
        case 4: CTXI_T(uint32_t, 32, CTXI_SCALAR(uint32_t)); break;
        default: CTXI_T(uint64_t, 64, CTXI_SCALAR(uint64_t)); break;
    }
    if (!bad) for (int c = 0; c < nc; c++) bad |= pos[c] != end[c];
    Py_END_ALLOW_THREADS
    free(st);
    PyBuffer_Release(&bs); PyBuffer_Release(&os); PyBuffer_Release(&Ws); PyBuffer_Release(&vs);
    PyBuffer_Release(&cs); PyBuffer_Release(&ob); PyBuffer_Release(&cbf);
    if (bad) { PyErr_SetString(PyExc_ValueError, "the base's contexts do not match their counts (did the base change?)"); return NULL; }
    Py_RETURN_NONE;
}

/* bits [0, n) of the bytes m (LSB first) ORed into W at bit offset off: words wholly inside the
 * range stored, the two at its ends ORed atomically (other units share them, maybe on other
 * threads). tb: scratch of (n + 7) / 8 + 16 bytes. */
static void ctxm_bits_place(uint64_t *W, uint64_t off, const uint8_t *m, uint64_t n, uint8_t *tb) {
    if (!n) return;
    uint64_t nb = (n + 7) / 8;
    memcpy(tb, m, nb); memset(tb + nb, 0, 16);
    if (n & 7) tb[nb - 1] &= (uint8_t)((1u << (n & 7)) - 1);
    uint64_t d0 = off >> 6, d1 = (off + n - 1) >> 6;
    for (uint64_t d = d0; d <= d1; d++) {
        uint64_t lo = d << 6 > off ? d << 6 : off, hi = (d + 1) << 6 < off + n ? (d + 1) << 6 : off + n;
        uint64_t sbit = lo - off, q = sbit >> 3; int r = (int)(sbit & 7);
        uint64_t v; memcpy(&v, tb + q, 8);
        v = (v >> r) | (r ? (uint64_t)tb[q + 8] << (64 - r) : 0);
        if (hi - lo < 64) v &= (1ull << (hi - lo)) - 1;
        v <<= (lo - (d << 6));
        if (d == d0 || d == d1) __atomic_fetch_or(&W[d], v, __ATOMIC_RELAXED);
        else W[d] = v;
    }
}

/* ------------------------------------------------------------------------------------------
 * Fused per-job paths: one call (GIL released throughout) for a run of units of one tensor.
 * kind: 0 raw, 1 bytegroup, 2 fieldsplit, 3 masked, 4 masked units cut from ctxm's bitmap and
 * packed values. op: -1 none, 0 xor, 1 zigzag. */

static int nplanes_of(int kind, int isz, int m) {
    if (kind == 0) return 1;
    if (kind == 1) return isz;
    if (kind == 2) return 1 + (1 + m + 7) / 8;
    return 1 + isz;                      /* 3 and 4: the bitmap, then a plane per byte */
}

static Py_ssize_t masked_split_c(const uint8_t *s, Py_ssize_t n, int isz, uint8_t *m, uint8_t **pb) {
    Py_ssize_t nnz = 0;
    switch (isz) {
        case 1: MASKED_SPLIT_T(uint8_t, 1); break;
        case 2: MASKED_SPLIT_T(uint16_t, 2); break;
        case 4: MASKED_SPLIT_T(uint32_t, 4); break;
        default: MASKED_SPLIT_T(uint64_t, 8); break;
    }
    return nnz;
}

static Py_ssize_t masked_merge_c(const uint8_t *m, const uint8_t *const *pb, Py_ssize_t nnz, Py_ssize_t n, int isz, uint8_t *o8) {
    ptrbuf out = {(void *)o8}; Py_ssize_t j = 0;
    switch (isz) {
        case 1: MASKED_MERGE_T(uint8_t, 1); break;
        case 2: MASKED_MERGE_T(uint16_t, 2); break;
        case 4: MASKED_MERGE_T(uint32_t, 4); break;
        default: MASKED_MERGE_T(uint64_t, 8); break;
    }
    return j;
}

/* The masked split of a delta in one pass (enc_run's kind 3 with a delta op): d = delta(x, b)
 * (op 0 xor, 1 zigzag, as delta_c; op -1: d = x), then masked_split_c(d). With AVX-512 (BW and
 * VBMI2) 2- and 4-byte elements go a vector at a time: the nonzero flags are the bitmap's bits
 * as they are, and the nonzero deltas are compressed to the front of the vector and split into
 * their byte planes with stores of a whole vector's width at position nnz (in bounds: nnz <= i
 * and planes hold n bytes; what lies beyond nnz is not part of a plane). The same bytes as
 * delta_c then masked_split_c (tests/test_transforms.py compares them over sizes, densities, ops
 * and both paths). tmp: room for n elements (the scalar path's deltas). */
static int msplit_simd = -1;             /* -1: not yet probed; 0: off; 1: on */
#ifdef CTXM_HAVE_SIMD
/* delta_c on a vector of EP-bit lanes (SH = EP - 1), d and b in registers; needs op, fl and
 * the lane constants sb (sign bit), ones and one in scope. Forward: d = delta(d, b). */
#define VDELTA_FWD(EP, SH, d, bv) do { \
    __m512i b_ = (bv); \
    if (op == 0) { d = _mm512_xor_si512(d, b_); break; } \
    if (fl) {               /* the order-preserving key: x ^ (sign ? all ones : sign bit) */ \
        d = _mm512_xor_si512(d, _mm512_or_si512(_mm512_srai_epi##EP(d, SH), sb)); \
        b_ = _mm512_xor_si512(b_, _mm512_or_si512(_mm512_srai_epi##EP(b_, SH), sb)); } \
    d = _mm512_sub_epi##EP(d, b_); \
    d = _mm512_xor_si512(_mm512_slli_epi##EP(d, 1), _mm512_srai_epi##EP(d, SH)); } while (0)
/* Inverse: d = delta^-1(d, b). */
#define VDELTA_INV(EP, SH, d, bv) do { \
    __m512i b_ = (bv); \
    if (op == 0) { d = _mm512_xor_si512(d, b_); break; } \
    if (fl) b_ = _mm512_xor_si512(b_, _mm512_or_si512(_mm512_srai_epi##EP(b_, SH), sb)); \
    __m512i dd_ = _mm512_xor_si512(_mm512_srli_epi##EP(d, 1), \
                                   _mm512_sub_epi##EP(_mm512_setzero_si512(), _mm512_and_si512(d, one))); \
    d = _mm512_add_epi##EP(b_, dd_); \
    if (fl) d = _mm512_xor_si512(d, _mm512_or_si512(_mm512_xor_si512(_mm512_srai_epi##EP(d, SH), ones), sb)); } while (0)

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
static Py_ssize_t msplit16_simd(const uint8_t *x8, const uint8_t *b8, Py_ssize_t n, int op, int fl,
                                uint8_t *m, uint8_t *p0, uint8_t *p1, Py_ssize_t *done) {
    Py_ssize_t nnz = 0, i = 0;
    const __m512i sb = _mm512_set1_epi16((short)0x8000), ones = _mm512_set1_epi16(-1), one = _mm512_set1_epi16(1);
    (void)ones; (void)one;
    for (; i + 32 <= n; i += 32) {
        __m512i d = _mm512_loadu_si512(x8 + 2 * i);
        if (op >= 0) VDELTA_FWD(16, 15, d, _mm512_loadu_si512(b8 + 2 * i));
        __mmask32 nz = _mm512_test_epi16_mask(d, d);
        uint32_t bits = (uint32_t)nz;
        memcpy(m + i / 8, &bits, 4);
        __m512i c = _mm512_maskz_compress_epi16(nz, d);
        _mm256_storeu_si256((__m256i *)(p0 + nnz), _mm512_cvtepi16_epi8(c));
        _mm256_storeu_si256((__m256i *)(p1 + nnz), _mm512_cvtepi16_epi8(_mm512_srli_epi16(c, 8)));
        nnz += __builtin_popcount(bits);
    }
    *done = i;
    return nnz;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
static Py_ssize_t msplit32_simd(const uint8_t *x8, const uint8_t *b8, Py_ssize_t n, int op, int fl,
                                uint8_t *m, uint8_t **pb, Py_ssize_t *done) {
    Py_ssize_t nnz = 0, i = 0;
    const __m512i sb = _mm512_set1_epi32((int)0x80000000u), ones = _mm512_set1_epi32(-1), one = _mm512_set1_epi32(1);
    (void)ones; (void)one;
    for (; i + 16 <= n; i += 16) {
        __m512i d = _mm512_loadu_si512(x8 + 4 * i);
        if (op >= 0) VDELTA_FWD(32, 31, d, _mm512_loadu_si512(b8 + 4 * i));
        __mmask16 nz = _mm512_test_epi32_mask(d, d);
        uint16_t bits = (uint16_t)nz;
        memcpy(m + i / 8, &bits, 2);
        __m512i c = _mm512_maskz_compress_epi32(nz, d);
        _mm_storeu_si128((__m128i *)(pb[0] + nnz), _mm512_cvtepi32_epi8(c));
        _mm_storeu_si128((__m128i *)(pb[1] + nnz), _mm512_cvtepi32_epi8(_mm512_srli_epi32(c, 8)));
        _mm_storeu_si128((__m128i *)(pb[2] + nnz), _mm512_cvtepi32_epi8(_mm512_srli_epi32(c, 16)));
        _mm_storeu_si128((__m128i *)(pb[3] + nnz), _mm512_cvtepi32_epi8(_mm512_srli_epi32(c, 24)));
        nnz += __builtin_popcount(bits);
    }
    *done = i;
    return nnz;
}
#endif

static void msplit_simd_init(void) {
#ifdef CTXM_HAVE_SIMD
    __builtin_cpu_init();
    msplit_simd = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
                  && __builtin_cpu_supports("avx512vbmi2") ? 1 : 0;
#else
    msplit_simd = 0;
#endif
}

static Py_ssize_t masked_delta_split(const uint8_t *x, const uint8_t *b, Py_ssize_t n, int isz, int op, int fl,
                                     uint8_t *tmp, uint8_t *m, uint8_t **pb) {
    Py_ssize_t nnz = 0, i = 0;
#ifdef CTXM_HAVE_SIMD
    if (msplit_simd == 1 && isz == 2) nnz = msplit16_simd(x, b, n, op, fl, m, pb[0], pb[1], &i);
    else if (msplit_simd == 1 && isz == 4) nnz = msplit32_simd(x, b, n, op, fl, m, pb, &i);
#endif
    if (i < n) {                 /* the rest (i is a multiple of 8: whole bitmap bytes) */
        const uint8_t *s = x + i * isz;
        if (op >= 0) { delta_c(s, b + i * isz, tmp, n - i, isz, op, fl, 0); s = tmp; }
        uint8_t *q[8];
        for (int k = 0; k < isz; k++) q[k] = pb[k] + nnz;
        nnz += masked_split_c(s, n - i, isz, m + i / 8, q);
    }
    return nnz;
}

/* The inverse in one pass (dec_run's kind 3 with a delta op): masked_merge_c of the planes, then
 * the delta's inverse against b (op -1: none), into o. With AVX-512, each vector's bitmap bits
 * say how many packed values it takes (loaded with a mask: nothing past them is read), expanded
 * to their elements' places, the inverse applied in registers. Returns the bitmap's count of set
 * bits over the n elements (the caller compares it with nnz, as after masked_merge_c); a vector
 * whose bits would take values past nnz ends the vector loop, and the scalar rest counts them. */
#ifdef CTXM_HAVE_SIMD
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
static Py_ssize_t mmerge16_simd(const uint8_t *m, const uint8_t *p0, const uint8_t *p1, Py_ssize_t nnz, Py_ssize_t n,
                                int op, int fl, const uint8_t *b8, uint8_t *o8, Py_ssize_t *done) {
    Py_ssize_t j = 0, i = 0;
    const __m512i sb = _mm512_set1_epi16((short)0x8000), ones = _mm512_set1_epi16(-1), one = _mm512_set1_epi16(1);
    for (; i + 32 <= n; i += 32) {
        uint32_t bits; memcpy(&bits, m + i / 8, 4);
        int cnt = __builtin_popcount(bits);
        if (j + cnt > nnz) break;
        __mmask32 lm = cnt == 32 ? 0xffffffffu : (1u << cnt) - 1;
        __m512i w = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(lm, p0 + j)),
                                    _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(lm, p1 + j)), 8));
        __m512i d = _mm512_maskz_expand_epi16((__mmask32)bits, w);
        if (op >= 0) VDELTA_INV(16, 15, d, _mm512_loadu_si512(b8 + 2 * i));
        _mm512_storeu_si512(o8 + 2 * i, d);
        j += cnt;
    }
    *done = i;
    return j;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
static Py_ssize_t mmerge32_simd(const uint8_t *m, const uint8_t *const *pb, Py_ssize_t nnz, Py_ssize_t n,
                                int op, int fl, const uint8_t *b8, uint8_t *o8, Py_ssize_t *done) {
    Py_ssize_t j = 0, i = 0;
    const __m512i sb = _mm512_set1_epi32((int)0x80000000u), ones = _mm512_set1_epi32(-1), one = _mm512_set1_epi32(1);
    for (; i + 16 <= n; i += 16) {
        uint16_t bits; memcpy(&bits, m + i / 8, 2);
        int cnt = __builtin_popcount(bits);
        if (j + cnt > nnz) break;
        __mmask16 lm = (__mmask16)(cnt == 16 ? 0xffffu : (1u << cnt) - 1);
        __m512i w = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, pb[0] + j));
        w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, pb[1] + j)), 8));
        w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, pb[2] + j)), 16));
        w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, pb[3] + j)), 24));
        __m512i d = _mm512_maskz_expand_epi32((__mmask16)bits, w);
        if (op >= 0) VDELTA_INV(32, 31, d, _mm512_loadu_si512(b8 + 4 * i));
        _mm512_storeu_si512(o8 + 4 * i, d);
        j += cnt;
    }
    *done = i;
    return j;
}
#endif

static Py_ssize_t masked_merge_delta(const uint8_t *m, const uint8_t *const *pb, Py_ssize_t nnz, Py_ssize_t n, int isz,
                                     int op, int fl, const uint8_t *b, uint8_t *tmp, uint8_t *o) {
    Py_ssize_t j = 0, i = 0;
#ifdef CTXM_HAVE_SIMD
    if (msplit_simd == 1 && isz == 2) j = mmerge16_simd(m, pb[0], pb[1], nnz, n, op, fl, b, o, &i);
    else if (msplit_simd == 1 && isz == 4) j = mmerge32_simd(m, pb, nnz, n, op, fl, b, o, &i);
#endif
    if (i < n) {                 /* the rest (i a multiple of 8), from the values not yet taken */
        const uint8_t *q[8];
        for (int k = 0; k < isz; k++) q[k] = pb[k] + j;
        uint8_t *t = op >= 0 ? tmp : o + i * isz;
        j += masked_merge_c(m + i / 8, q, nnz - j, n - i, isz, t);
        if (op >= 0) delta_c(t, b + i * isz, o + i * isz, n - i, isz, op, fl, 1);
    }
    return j;
}

/* masked_merge_delta(mask, planes, nnz, itemsize, op, is_float, base or None, out) -> the mask's
 * count of set bits (nnz when it agrees with the planes): out = delta^-1(merge(mask, planes), base) */
static PyObject *py_masked_merge_delta(PyObject *self, PyObject *args) {
    Py_buffer mask, out, bs = {0}; PyObject *pl, *bo; Py_ssize_t nnz; int isz, op, fl; Py_buffer p[MAXP];
    if (!PyArg_ParseTuple(args, "y*OniiiOw*", &mask, &pl, &nnz, &isz, &op, &fl, &bo, &out)) return NULL;
    int have_b = bo != Py_None;
    if (have_b && PyObject_GetBuffer(bo, &bs, PyBUF_C_CONTIGUOUS) < 0) { PyBuffer_Release(&mask); PyBuffer_Release(&out); return NULL; }
    Py_ssize_t n = isz > 0 ? out.len / isz : 0;
    if ((isz != 1 && isz != 2 && isz != 4 && isz != 8) || nnz < 0 || nnz > n || mask.len < (n + 7) / 8 || out.len % isz
            || op < -1 || op > 1 || (op >= 0) != have_b || (have_b && bs.len != out.len) || get_planes(pl, p, isz, 0, nnz) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad arguments");
        PyBuffer_Release(&mask); PyBuffer_Release(&out); if (have_b) PyBuffer_Release(&bs); return NULL;
    }
    uint8_t *tmp = malloc(out.len ? (size_t)out.len : 1);
    if (!tmp) { release(p, isz); PyBuffer_Release(&mask); PyBuffer_Release(&out); if (have_b) PyBuffer_Release(&bs); return PyErr_NoMemory(); }
    Py_ssize_t j;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *pb[8];
    for (int k = 0; k < isz; k++) pb[k] = p[k].buf;
    j = masked_merge_delta(mask.buf, pb, nnz, n, isz, op, fl, have_b ? bs.buf : NULL, tmp, out.buf);
    Py_END_ALLOW_THREADS
    free(tmp); release(p, isz); PyBuffer_Release(&mask); PyBuffer_Release(&out); if (have_b) PyBuffer_Release(&bs);
    return PyLong_FromSsize_t(j);
}

/* masked_delta_split(x, base or None, itemsize, op, is_float, mask_out, planes) -> nnz: the masked
 * split of delta(x, base) (op -1 or base None: of x); planes must hold n bytes each */
static PyObject *py_masked_delta_split(PyObject *self, PyObject *args) {
    Py_buffer xs, bs = {0}, mask; int isz, op, fl; PyObject *bo, *pl; Py_buffer p[MAXP];
    if (!PyArg_ParseTuple(args, "y*Oiiiw*O", &xs, &bo, &isz, &op, &fl, &mask, &pl)) return NULL;
    int have_b = bo != Py_None;
    if (have_b && PyObject_GetBuffer(bo, &bs, PyBUF_C_CONTIGUOUS) < 0) { PyBuffer_Release(&xs); PyBuffer_Release(&mask); return NULL; }
    Py_ssize_t n = isz > 0 ? xs.len / isz : 0;
    if ((isz != 1 && isz != 2 && isz != 4 && isz != 8) || xs.len % isz || op < -1 || op > 1 || (op >= 0) != have_b
            || (have_b && bs.len != xs.len) || mask.len < (n + 7) / 8 || get_planes(pl, p, isz, 1, n) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad arguments");
        PyBuffer_Release(&xs); PyBuffer_Release(&mask); if (have_b) PyBuffer_Release(&bs); return NULL;
    }
    uint8_t *tmp = malloc(xs.len ? (size_t)xs.len : 1);
    if (!tmp) { release(p, isz); PyBuffer_Release(&xs); PyBuffer_Release(&mask); if (have_b) PyBuffer_Release(&bs); return PyErr_NoMemory(); }
    Py_ssize_t nnz;
    Py_BEGIN_ALLOW_THREADS
    uint8_t *pb[8];
    for (int k = 0; k < isz; k++) pb[k] = p[k].buf;
    nnz = masked_delta_split(xs.buf, have_b ? bs.buf : NULL, n, isz, op, fl, tmp, mask.buf, pb);
    Py_END_ALLOW_THREADS
    free(tmp); release(p, isz); PyBuffer_Release(&xs); PyBuffer_Release(&mask); if (have_b) PyBuffer_Release(&bs);
    return PyLong_FromSsize_t(nnz);
}

static PyObject *py_msplit_simd(PyObject *self, PyObject *args) {
    int flag = -1;
    if (!PyArg_ParseTuple(args, "|i", &flag)) return NULL;
    if (flag == 0) msplit_simd = 0;
    else if (flag == 1) msplit_simd_init();
    return PyLong_FromLong(msplit_simd);
}

static int check_bounds(const int64_t *B, Py_ssize_t U, Py_ssize_t len, int isz, Py_ssize_t *maxunit) {
    *maxunit = 0;
    if (B[0] < 0) return -1;
    for (Py_ssize_t u = 0; u < U; u++) {
        if (B[u + 1] < B[u] || B[u + 1] > len || (B[u + 1] - B[u]) % isz) return -1;
        if (B[u + 1] - B[u] > *maxunit) *maxunit = B[u + 1] - B[u];
    }
    return 0;
}

/* encode_units(src, bounds, dsrc, drb, d0, d1, base, itemsize, kind, exp_bits, man_bits, op, is_float,
 *              huff, store_bits, sample, arena, rec, nnz_out, dig_out) -> arena bytes used
 * Units u are src[bounds[u]:bounds[u+1]] (deltas against base at the same offsets when op >= 0),
 * each split into its planes, laid out one after the other in arena. For each plane, rec gets
 * (state, offset in arena, length): state 0 stored (the plane's bytes), 1 a finished zstd frame
 * of Huffman literals (plane 0 of fieldsplit when huff), 2 the plane, still to be zstd-coded.
 * A plane is stored when empty, or when it holds at least 256 bytes and the order-0 entropy of
 * every max(1, len / sample)-th byte is above store_bits (codecs.ChunkCoder.encode's gate).
 * dig_out gets XXH64 of rows d0..d1-1 of dsrc (rows of drb bytes, the last one shorter). */
typedef struct {
    Py_buffer src, bnd, dsrc, arena, rec, nz, dig, base, cW, ccum, cblk;
    int have_base, have_ctxm, isz, kind, e, m, op, fl, huff, P;
    Py_ssize_t drb, d0, d1, sample, U, maxunit, used, csorted, cnblk;
    double store_bits;
} encjob;

/* kind 4's tables: blocks ascending from 0 to nsorted (their last entry), values, bitmap and cum
 * covering nsorted positions */
static int ctxm_check(encjob *j) {
    Py_ssize_t nb = j->cblk.len / 8 - 1;
    const uint64_t *blk = j->cblk.buf;
    if (j->cblk.len % 8 || nb < 1 || blk[0] != 0 || (uintptr_t)blk % 8 || (uintptr_t)j->cW.buf % 8
            || (uintptr_t)j->ccum.buf % 8) return -1;
    for (Py_ssize_t i = 0; i < nb; i++) if (blk[i + 1] <= blk[i]) return -1;
    uint64_t ns = blk[nb];
    if (ns > (uint64_t)(j->src.len / j->isz) || (uint64_t)(j->cW.len / 8) < ns / 64 + 2
            || (uint64_t)(j->ccum.len / 8) < ns / 64 + 2) return -1;
    j->csorted = (Py_ssize_t)ns; j->cnblk = nb;
    return 0;
}

static void enc_release(encjob *j) {
    PyBuffer_Release(&j->src); PyBuffer_Release(&j->bnd); PyBuffer_Release(&j->dsrc); PyBuffer_Release(&j->arena);
    PyBuffer_Release(&j->rec); PyBuffer_Release(&j->nz); PyBuffer_Release(&j->dig);
    if (j->have_base) PyBuffer_Release(&j->base);
    if (j->have_ctxm) { PyBuffer_Release(&j->cW); PyBuffer_Release(&j->ccum); PyBuffer_Release(&j->cblk); }
}

/* parse and check one call's arguments (with the GIL); on error an exception is set and nothing is held */
static int enc_parse(PyObject *args, encjob *j) {
    PyObject *bo, *co = Py_None; const char *err = NULL;
    memset(j, 0, sizeof(*j));
    if (!PyTuple_Check(args)) { PyErr_SetString(PyExc_TypeError, "a tuple of arguments"); return -1; }
    if (!PyArg_ParseTuple(args, "y*y*y*nnnOiiiiiiidnw*w*w*w*|O", &j->src, &j->bnd, &j->dsrc, &j->drb, &j->d0, &j->d1, &bo,
                          &j->isz, &j->kind, &j->e, &j->m, &j->op, &j->fl, &j->huff, &j->store_bits, &j->sample,
                          &j->arena, &j->rec, &j->nz, &j->dig, &co)) return -1;
    if (bo != Py_None) {
        if (PyObject_GetBuffer(bo, &j->base, PyBUF_C_CONTIGUOUS) < 0) { j->have_base = 0; enc_release(j); return -1; }
        j->have_base = 1;
    }
    if (co != Py_None) {                 /* kind 4: (bitmap, cum, blocks) of ctxm */
        if (!PyArg_ParseTuple(co, "y*y*y*", &j->cW, &j->ccum, &j->cblk)) { enc_release(j); return -1; }
        j->have_ctxm = 1;
    }
    int isz = j->isz, kind = j->kind;
    j->U = j->bnd.len / 8 - 1;
    const int64_t *B = j->bnd.buf;
    j->P = nplanes_of(kind, isz, j->m);
    if ((isz != 1 && isz != 2 && isz != 4 && isz != 8) || kind < 0 || kind > 4 || j->U < 0 || j->bnd.len % 8
            || (kind == 4) != j->have_ctxm || (kind == 4 && j->op != -1)
            || (kind == 2 && !((isz == 2 || isz == 4) && j->e > 0 && j->m > 0 && j->e + j->m + 1 == 8 * isz))
            || j->P > MAXP + 1 || j->op < -1 || j->op > 1 || (j->op >= 0) != j->have_base
            || (j->have_base && j->base.len != j->src.len)
            || j->sample < 1 || j->drb < 1 || j->d0 < 0 || j->d1 < j->d0 || (j->d1 > j->d0 && (j->d1 - 1) * j->drb >= j->dsrc.len)
            || j->rec.len < (Py_ssize_t)(j->U * j->P * 3 * 8) || j->nz.len < j->U * 8 || j->dig.len < (j->d1 - j->d0) * 8
            || (uintptr_t)j->rec.buf % 8 || (uintptr_t)j->nz.buf % 8 || (uintptr_t)j->dig.buf % 8)
        err = "bad arguments";
    else if (kind == 4 && ctxm_check(j) < 0) err = "bad sorted-stream tables";
    else if (j->U > 0 && check_bounds(B, j->U, kind == 4 ? j->csorted * isz : j->src.len, isz, &j->maxunit) < 0)
        err = "bad unit bounds";
    else {
        Py_ssize_t need = 0;
        for (Py_ssize_t u = 0; u < j->U; u++) {
            Py_ssize_t n = (B[u + 1] - B[u]) / isz;
            need += kind >= 3 ? (n + 7) / 8 + n * isz : n * (kind == 0 ? isz : j->P);
        }
        if (j->arena.len < need) err = "arena too small";
    }
    if (err) { enc_release(j); PyErr_SetString(PyExc_ValueError, err); return -1; }
    return 0;
}

/* the work (no GIL): 0, or -1 when out of memory, -2 when kind 4's tables disagree */
static int enc_run(encjob *j) {
    int isz = j->isz, kind = j->kind, e = j->e, m = j->m, op = j->op, fl = j->fl, P = j->P;
    Py_ssize_t maxunit = j->maxunit, sample = j->sample;
    const int64_t *B = j->bnd.buf;
    uint8_t *tmp = NULL, *hs = NULL; int oom = 0, lied = 0; Py_ssize_t pos = 0;
    if (op >= 0 && kind != 0 && maxunit) { tmp = malloc(maxunit); oom |= !tmp; }
    uint32_t *pt = NULL;
    if (j->huff && maxunit) { hs = malloc(2 * (size_t)maxunit + 256); oom |= !hs; pt = malloc(HUF_PAIRS * sizeof(uint32_t)); }
    const uint8_t *S = j->dsrc.buf;
    uint64_t *D = j->dig.buf;
    /* Units that are the digest rows themselves (every tensor but a context-sorted one, whose
     * digests its sort took) are read once, into the arena or a copy, and the digest and the
     * coding both taken from that: another thread changing the tensor meanwhile can never make a
     * row's digest disagree with its coded bytes. */
    int rowwise = kind != 4 && j->U == j->d1 - j->d0 && S == (const uint8_t *)j->src.buf && j->dsrc.len == j->src.len;
    for (Py_ssize_t u = 0; rowwise && u < j->U; u++) {
        Py_ssize_t a = (j->d0 + u) * j->drb, b = j->src.len - a < j->drb ? j->src.len : a + j->drb;
        rowwise = B[u] == a && B[u + 1] == b;
    }
    uint8_t *xr = NULL;
    if (rowwise && !(kind == 0 && op < 0) && maxunit) { xr = malloc(maxunit); oom |= !xr; }
    for (Py_ssize_t r = j->d0; r < j->d1 && !oom && !rowwise; r++) {
        Py_ssize_t a = r * j->drb, len = j->dsrc.len - a < j->drb ? j->dsrc.len - a : j->drb;
        D[r - j->d0] = xxh64(S + a, (size_t)len, 0);
    }
    uint8_t *A = j->arena.buf; int64_t *R = j->rec.buf;
    for (Py_ssize_t u = 0; u < j->U && !oom; u++) {
        Py_ssize_t a = B[u], len = B[u + 1] - B[u], n = len / isz;
        const uint8_t *x = (const uint8_t *)j->src.buf + a;
        const uint8_t *bp = j->have_base ? (const uint8_t *)j->base.buf + a : NULL;
        uint8_t *pl[MAXP + 1]; Py_ssize_t plen[MAXP + 1];
        ((int64_t *)j->nz.buf)[u] = 0;
        if (rowwise && xr) {
            if (len) memcpy(xr, x, (size_t)len);
            D[u] = xxh64(xr, (size_t)len, 0);
            x = xr;
        } else if (rowwise && kind != 0) D[u] = xxh64(x, (size_t)len, 0);     /* (only empty units here) */
        if (kind == 0) {
            pl[0] = A + pos; plen[0] = len;
            if (op >= 0) delta_c(x, bp, pl[0], n, isz, op, fl, 0);
            else if (len) memcpy(pl[0], x, len);
            if (rowwise && !xr) D[u] = xxh64(pl[0], (size_t)len, 0);
            pos += len;
        } else {
            if (op >= 0 && kind != 3) { delta_c(x, bp, tmp, n, isz, op, fl, 0); x = tmp; }
            if (kind >= 3) {
                pl[0] = A + pos; plen[0] = (n + 7) / 8; pos += plen[0];
                for (int k = 0; k < isz; k++) { pl[1 + k] = A + pos; pos += n; }
                Py_ssize_t nnz = kind == 3 ? masked_delta_split(x, bp, n, isz, op, fl, tmp, pl[0], pl + 1)
                    : ctxm_unit(j->cW.buf, j->ccum.buf, j->cblk.buf, j->cnblk, j->src.buf, isz,
                                (uint64_t)(a / isz), (uint64_t)((a + len) / isz), pl[0], pl + 1);
                if (nnz < 0) { lied = 1; break; }
                for (int k = 0; k < isz; k++) plen[1 + k] = nnz;
                ((int64_t *)j->nz.buf)[u] = nnz;
            } else {
                Py_buffer pb[MAXP];
                for (int k = 0; k < P; k++) { pl[k] = A + pos; plen[k] = n; pb[k].buf = pl[k]; pos += n; }
                if (kind == 1) bytegroup_split(x, n, isz, pb);
                else if (isz == 2) split16(x, n, e, m, pl[0], pl[1], P == 3 ? pl[2] : NULL);
                else split32(x, n, e, m, P - 1, pb);
            }
        }
        for (int k = 0; k < P; k++) {
            int64_t *r = R + 3 * (u * P + k);
            Py_ssize_t L = plen[k], step = L / sample > 1 ? L / sample : 1;
            r[1] = pl[k] - A; r[2] = L;
            if (L == 0 || (L >= 256 && entropy_c(pl[k], L, step) > j->store_bits)) { r[0] = 0; continue; }
            if (j->huff && kind == 2 && k == 0) {
                size_t f = huff_frame_c(pl[k], (size_t)L, hs, 2 * (size_t)maxunit + 256, pt);
                if (f) { memcpy(pl[k], hs, f); r[0] = 1; r[2] = (int64_t)f; continue; }
            }
            r[0] = 2;
        }
    }
    free(tmp); free(hs); free(pt); free(xr);
    j->used = pos;
    return oom ? -1 : lied ? -2 : 0;
}

static PyObject *encode_units(PyObject *self, PyObject *args) {
    encjob j; int rc;
    if (enc_parse(args, &j) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = enc_run(&j);
    Py_END_ALLOW_THREADS
    enc_release(&j);
    if (rc == -2) { PyErr_SetString(PyExc_ValueError, "bad sorted-stream tables"); return NULL; }
    if (rc < 0) return PyErr_NoMemory();
    return PyLong_FromSsize_t(j.used);
}

/* encode_many(calls): encode_units for each tuple of arguments in the list ``calls``, all of
 * them with one release of the GIL (a job of many small tensors). Returns the list of results. */
static PyObject *encode_many(PyObject *self, PyObject *args) {
    PyObject *calls;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &calls)) return NULL;
    Py_ssize_t N = PyList_GET_SIZE(calls), got = 0; int rc = 0;
    encjob *js = PyMem_Calloc(N + 1, sizeof(encjob));
    if (!js) return PyErr_NoMemory();
    for (; got < N; got++) if (enc_parse(PyList_GET_ITEM(calls, got), &js[got]) < 0) break;
    if (got == N) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < N && !rc; i++) rc = enc_run(&js[i]);
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < got; i++) enc_release(&js[i]);
    PyObject *res = NULL;
    if (got == N && !rc) {
        res = PyList_New(N);
        for (Py_ssize_t i = 0; res && i < N; i++) {
            PyObject *v = PyLong_FromSsize_t(js[i].used);
            if (!v) { Py_CLEAR(res); break; }
            PyList_SET_ITEM(res, i, v);
        }
    } else if (rc == -2) PyErr_SetString(PyExc_ValueError, "bad sorted-stream tables");
    else if (rc) PyErr_NoMemory();
    PyMem_Free(js);
    return res;
}

/* decode_units(planes, bounds, out, base, itemsize, kind, exp_bits, man_bits, op, is_float, nnz, dig_out)
 *   -> -1, or the first unit whose bitmap does not count nnz[u] elements
 * The inverse of encode_units: planes (a tuple of P buffers per unit, each at least the plane's
 * size) are merged into out[bounds[u]:bounds[u+1]] (the delta inverted against base at the same
 * offsets when op >= 0), and when dig_out is not empty it gets XXH64 of each unit's bytes. */
typedef struct {
    Py_buffer bnd, out, nz, dig, base, cW, cvs; Py_buffer *pv;
    int have_base, have_ctxm, got, isz, kind, e, m, op, fl, P, verify;
    Py_ssize_t U, maxunit, bad;
} decjob;

static void dec_release(decjob *j) {
    if (j->pv) { for (int i = 0; i < j->got; i++) PyBuffer_Release(&j->pv[i]); PyMem_Free(j->pv); j->pv = NULL; }
    PyBuffer_Release(&j->bnd); PyBuffer_Release(&j->out); PyBuffer_Release(&j->nz); PyBuffer_Release(&j->dig);
    if (j->have_base) PyBuffer_Release(&j->base);
    if (j->have_ctxm) { PyBuffer_Release(&j->cW); PyBuffer_Release(&j->cvs); }
}

static int dec_parse(PyObject *args, decjob *j) {
    PyObject *pl, *bo, *co = Py_None; const char *err = NULL;
    memset(j, 0, sizeof(*j));
    if (!PyTuple_Check(args)) { PyErr_SetString(PyExc_TypeError, "a tuple of arguments"); return -1; }
    if (!PyArg_ParseTuple(args, "O!y*w*Oiiiiiiy*w*|O", &PyTuple_Type, &pl, &j->bnd, &j->out, &bo, &j->isz, &j->kind, &j->e,
                          &j->m, &j->op, &j->fl, &j->nz, &j->dig, &co)) return -1;
    if (bo != Py_None) {
        if (PyObject_GetBuffer(bo, &j->base, PyBUF_C_CONTIGUOUS) < 0) { dec_release(j); return -1; }
        j->have_base = 1;
    }
    if (co != Py_None) {                 /* kind 4: (bitmap, first value index of each unit) */
        if (!PyArg_ParseTuple(co, "w*y*", &j->cW, &j->cvs)) { dec_release(j); return -1; }
        j->have_ctxm = 1;
    }
    int isz = j->isz, kind = j->kind;
    j->U = j->bnd.len / 8 - 1;
    const int64_t *B = j->bnd.buf;
    j->P = nplanes_of(kind, isz, j->m);
    j->verify = j->dig.len > 0;
    if ((isz != 1 && isz != 2 && isz != 4 && isz != 8) || kind < 0 || kind > 4 || j->U < 0 || j->bnd.len % 8
            || (kind == 2 && !((isz == 2 || isz == 4) && j->e > 0 && j->m > 0 && j->e + j->m + 1 == 8 * isz))
            || j->P > MAXP + 1 || j->op < -1 || j->op > 1 || (j->op >= 0) != j->have_base
            || (j->have_base && j->base.len != j->out.len)
            || (kind == 4) != j->have_ctxm || (kind == 4 && (j->op != -1 || j->verify || j->cvs.len < j->U * 8
                                                              || (uintptr_t)j->cW.buf % 8 || (uintptr_t)j->cvs.buf % 8))
            || PyTuple_GET_SIZE(pl) != j->U * j->P || (kind >= 3 && j->nz.len < j->U * 8) || (j->verify && j->dig.len < j->U * 8)) {
        err = "bad arguments"; goto fail;
    }
    if (j->U > 0 && check_bounds(B, j->U, j->out.len, isz, &j->maxunit) < 0) { err = "bad unit bounds"; goto fail; }
    j->pv = PyMem_Calloc(j->U * j->P + 1, sizeof(Py_buffer));
    if (!j->pv) { PyErr_NoMemory(); goto fail; }
    for (; j->got < j->U * j->P; j->got++)
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pl, j->got), &j->pv[j->got], PyBUF_C_CONTIGUOUS) < 0) goto fail;
    const int64_t *NZ = j->nz.buf, *VS = j->have_ctxm ? j->cvs.buf : NULL;
    if (kind == 4 && j->U > 0 && (uint64_t)(j->cW.len / 8) < (uint64_t)(B[j->U] / isz) / 64 + 2) { err = "bad unit bounds"; goto fail; }
    for (Py_ssize_t u = 0; u < j->U; u++) {       /* every plane holds at least its size */
        Py_ssize_t n = (B[u + 1] - B[u]) / isz;
        if (kind >= 3 && (NZ[u] < 0 || NZ[u] > n)) { err = "bad nnz"; goto fail; }
        if (kind == 4 && (VS[u] < 0 || VS[u] > j->out.len / isz - NZ[u])) { err = "bad value offsets"; goto fail; }
        for (int k = 0; k < j->P; k++) {
            Py_ssize_t want = kind == 0 ? n * isz : kind < 3 ? n : k == 0 ? (n + 7) / 8 : NZ[u];
            if (j->pv[u * j->P + k].len < want) { err = "plane too small"; goto fail; }
        }
    }
    return 0;
fail:
    dec_release(j);
    if (err) PyErr_SetString(PyExc_ValueError, err);
    return -1;
}

static int dec_run(decjob *j) {
    int isz = j->isz, kind = j->kind, op = j->op, fl = j->fl, P = j->P;
    const int64_t *B = j->bnd.buf, *NZ = j->nz.buf;
    uint8_t *tmp = NULL;
    j->bad = -1;
    if (op >= 0 && kind != 0 && j->maxunit) { tmp = malloc(j->maxunit); if (!tmp) return -1; }
    if (kind == 4) { tmp = malloc((size_t)j->maxunit / 8 + 32); if (!tmp) return -1; }
    for (Py_ssize_t u = 0; u < j->U; u++) {
        Py_ssize_t a = B[u], len = B[u + 1] - B[u], n = len / isz;
        if (kind == 4) {                  /* the unit's bits into the bitmap, its values packed at their index */
            const uint8_t *m = j->pv[u * P].buf; Py_ssize_t cnt = 0, nb = n / 8;
            for (Py_ssize_t i = 0; i < nb; i++) cnt += __builtin_popcount(m[i]);
            if (n & 7) cnt += __builtin_popcount(m[nb] & ((1u << (n & 7)) - 1));
            if (cnt != NZ[u]) { j->bad = u; break; }
            ctxm_bits_place(j->cW.buf, (uint64_t)(a / isz), m, (uint64_t)n, tmp);
            uint8_t *v = (uint8_t *)j->out.buf + ((const int64_t *)j->cvs.buf)[u] * isz;
            for (int k = 0; k < isz; k++) {
                const uint8_t *pk = j->pv[u * P + 1 + k].buf;
                for (Py_ssize_t i = 0; i < NZ[u]; i++) v[i * isz + k] = pk[i];
            }
            continue;
        }
        uint8_t *o = (uint8_t *)j->out.buf + a, *t = op >= 0 ? tmp : o;
        const uint8_t *bp = j->have_base ? (const uint8_t *)j->base.buf + a : NULL;
        const uint8_t *pp[MAXP + 1];
        for (int k = 0; k < P; k++) pp[k] = j->pv[u * P + k].buf;
        if (kind == 0) {
            if (op >= 0) delta_c(pp[0], bp, o, n, isz, op, fl, 1);
            else if (len) memcpy(o, pp[0], len);
        } else {
            if (kind == 3) {
                if (masked_merge_delta(pp[0], pp + 1, NZ[u], n, isz, op, fl, bp, tmp, o) != NZ[u]) { j->bad = u; break; }
            } else {
                merge_c(pp, n, isz, kind == 2 ? j->e : 0, kind == 2 ? j->m : 0, P, t);
                if (op >= 0) delta_c(t, bp, o, n, isz, op, fl, 1);
            }
        }
        if (j->verify) ((uint64_t *)j->dig.buf)[u] = xxh64(o, (size_t)len, 0);
    }
    free(tmp);
    return 0;
}

static PyObject *decode_units(PyObject *self, PyObject *args) {
    decjob j; int rc;
    if (dec_parse(args, &j) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = dec_run(&j);
    Py_END_ALLOW_THREADS
    dec_release(&j);
    if (rc < 0) return PyErr_NoMemory();
    return PyLong_FromSsize_t(j.bad);
}

/* decode_many(calls): decode_units for each tuple of arguments in the list, with one release of
 * the GIL; stops at the first call that finds a bad bitmap. Returns the list of results (-1, or
 * the bad unit; calls after a bad one are not run and give -2). */
static PyObject *decode_many(PyObject *self, PyObject *args) {
    PyObject *calls;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &calls)) return NULL;
    Py_ssize_t N = PyList_GET_SIZE(calls), got = 0; int rc = 0;
    decjob *js = PyMem_Calloc(N + 1, sizeof(decjob));
    if (!js) return PyErr_NoMemory();
    for (; got < N; got++) if (dec_parse(PyList_GET_ITEM(calls, got), &js[got]) < 0) break;
    for (Py_ssize_t i = 0; i < N; i++) js[i].bad = -2;
    if (got == N) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < N && !rc; i++) {
            rc = dec_run(&js[i]);
            if (js[i].bad >= 0) break;
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < got; i++) dec_release(&js[i]);
    PyObject *res = NULL;
    if (got == N && !rc) {
        res = PyList_New(N);
        for (Py_ssize_t i = 0; res && i < N; i++) {
            PyObject *v = PyLong_FromSsize_t(js[i].bad);
            if (!v) { Py_CLEAR(res); break; }
            PyList_SET_ITEM(res, i, v);
        }
    } else if (rc) PyErr_NoMemory();
    PyMem_Free(js);
    return res;
}

/* ---------------------------------------------------------------- rANS chunks (codec 2, feature "ans")
 * FORMAT.md "The ans codec" is the definition; mithril_gpu/ans.py the numpy reference (tests
 * compare the bytes). A payload: u8 L (table log), u8 lanes, u8 nsym - 1, the symbols (a list
 * when nsym < 32, else a 32-byte bitmap), nsym LEB128 frequencies summing to 2^L, lanes u32
 * initial states, then u16 words. Symbol i is decoded by lane i % lanes; a lane whose state falls
 * under 2^16 after a symbol reads the next word. Every state ends at 2^16, every word is read. */
#define ANS_LOW 65536u
#define ANS_MAXLANES 32
#define ANS_MAXLOG 15
#define ANS_LOG 12                 /* the table log this writer uses */

/* counts -> frequencies summing to 2^L, every present symbol at least 1 (integer only: the
 * reference computes the same) */
static void ans_normalize(const uint64_t *cnt, uint64_t n, int L, uint32_t *f) {
    uint64_t M = 1ull << L; int64_t sum = 0; int big = -1;
    for (int s = 0; s < 256; s++) {
        f[s] = 0;
        if (!cnt[s]) continue;
        uint64_t v = (2 * cnt[s] * M + n) / (2 * n);
        if (v < 1) v = 1;
        f[s] = (uint32_t)v; sum += (int64_t)v;
        if (big < 0 || cnt[s] > cnt[big]) big = s;
    }
    int64_t diff = (int64_t)M - sum;
    if (diff > 0) f[big] += (uint32_t)diff;
    while (diff < 0) {
        int b = -1;
        for (int s = 0; s < 256; s++) if (f[s] > 1 && (b < 0 || f[s] > f[b])) b = s;
        if (b < 0) break;                          /* more symbols than slots: the caller never asks */
        uint32_t take = f[b] - 1;
        if ((int64_t)take > -diff) take = (uint32_t)(-diff);
        f[b] -= take; diff += take;
    }
}

/* the header (L, lanes, symbols, frequencies); returns its size */
static size_t ans_header(uint8_t *d, int L, int mode, int lanes, const uint32_t *f) {
    int nsym = 0; size_t h = 3;
    for (int s = 0; s < 256; s++) nsym += f[s] != 0;
    d[0] = (uint8_t)(L | mode << 4); d[1] = (uint8_t)lanes; d[2] = (uint8_t)(nsym - 1);
    if (nsym < 32) { for (int s = 0; s < 256; s++) if (f[s]) d[h++] = (uint8_t)s; }
    else { memset(d + h, 0, 32); for (int s = 0; s < 256; s++) if (f[s]) d[h + (s >> 3)] |= (uint8_t)(1u << (s & 7)); h += 32; }
    for (int s = 0; s < 256; s++) if (f[s]) {
        uint32_t v = f[s];
        while (v >= 128) { d[h++] = (uint8_t)(v | 128); v >>= 7; }
        d[h++] = (uint8_t)v;
    }
    return h;
}

/* ---- the AVX2 path of the ans encoder (x86-64, chosen at run time): 8 lanes per instruction,
 * the same bytes as the scalar code (tests compare both with the reference). Lanes are taken in
 * groups of 8 in the order the scalar loop takes them, so words are written in the same order.
 * (An AVX2 decoder on the same plan, with a gathered 32-bit table, ran at 0.93x the scalar one
 * on this project's AMD EPYC VM, and was dropped.) */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ANS_HAVE_AVX2_CODE 1
static int ans_simd = -1;                 /* -1: not yet probed; 0: off; 1: on */
static uint8_t ans_cmp_lut[256][16];      /* encoder: the emitting lanes' words, at the top, in lane order */

static void ans_simd_init(void) {
    for (int m = 0; m < 256; m++) {
        int k = __builtin_popcount(m), t = 0;
        memset(ans_cmp_lut[m], 0x80, 16);
        for (int i = 0; i < 8; i++) if (m >> i & 1) {
            ans_cmp_lut[m][16 - 2 * k + 2 * t] = (uint8_t)(2 * i);
            ans_cmp_lut[m][16 - 2 * k + 2 * t + 1] = (uint8_t)(2 * i + 1);
            t++;
        }
    }
    __builtin_cpu_init();
    ans_simd = __builtin_cpu_supports("avx2") ? 1 : 0;
}

/* whole rounds r = full, full - lanes, ..., lanes of the encoder (lanes a multiple of 8); fc[s] =
 * freq | cum << 16. Returns the new p, or NULL where the scalar loop would have returned 0. */
__attribute__((target("avx2")))
static uint8_t *ans_enc_rounds_avx2(const uint8_t *src, size_t full, int lanes, int L, uint32_t *x,
                                    const uint32_t *fc, uint8_t *p, const uint8_t *lim) {
    const __m256i one = _mm256_set1_epi32(1), lo16 = _mm256_set1_epi32(0xffff), Mv = _mm256_set1_epi32(1 << L);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
    const __m256d two31 = _mm256_set1_pd(2147483648.0);
    const __m128i hs = _mm_cvtsi32_si128(32 - L);
    for (size_t r = full; r > 0; r -= (size_t)lanes) {
        if (p - lim < 2 * (ptrdiff_t)lanes) return NULL;
        for (int g = lanes / 8 - 1; g >= 0; g--) {
            const uint8_t *s8 = src + r - (size_t)lanes + 8 * (size_t)g;
            __m256i xs = _mm256_loadu_si256((const __m256i *)(x + 8 * g));
            __m256i sym = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)s8));
            __m256i e = _mm256_i32gather_epi32((const int *)fc, sym, 4);
            __m256i f = _mm256_and_si256(e, lo16), cum = _mm256_srli_epi32(e, 16);
            __m256i emit = _mm256_cmpgt_epi32(_mm256_srl_epi32(xs, hs), _mm256_sub_epi32(f, one));
            int m = _mm256_movemask_ps(_mm256_castsi256_ps(emit));     /* no branch on m: it is a coin toss */
            __m256i w = _mm256_packus_epi32(_mm256_and_si256(xs, lo16), _mm256_setzero_si256());
            __m128i w8 = _mm256_castsi256_si128(_mm256_permute4x64_epi64(w, 0x08));
            __m128i c = _mm_shuffle_epi8(w8, _mm_loadu_si128((const __m128i *)ans_cmp_lut[m]));
            _mm_storeu_si128((__m128i *)(p - 16), c);
            p -= 2 * __builtin_popcount(m);
            xs = _mm256_blendv_epi8(xs, _mm256_srli_epi32(xs, 16), emit);
            /* q = x div f in double precision (x read as unsigned) */
            __m256i xb = _mm256_xor_si256(xs, sign);
            __m256d x0 = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(xb)), two31);
            __m256d x1 = _mm256_add_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(xb, 1)), two31);
            __m256d f0 = _mm256_cvtepi32_pd(_mm256_castsi256_si128(f)), f1 = _mm256_cvtepi32_pd(_mm256_extracti128_si256(f, 1));
            __m128i q0 = _mm256_cvttpd_epi32(_mm256_div_pd(x0, f0)), q1 = _mm256_cvttpd_epi32(_mm256_div_pd(x1, f1));
            __m256i q = _mm256_set_m128i(q1, q0);
            xs = _mm256_add_epi32(_mm256_add_epi32(xs, cum), _mm256_mullo_epi32(q, _mm256_sub_epi32(Mv, f)));
            _mm256_storeu_si256((__m256i *)(x + 8 * g), xs);
        }
    }
    return p;
}

#else
#define ANS_HAVE_AVX2_CODE 0
static int ans_simd = 0;
static void ans_simd_init(void) {}
#endif

/* ans_simd(flag=-1) -> whether the AVX2 encoder is on (1) or off (0); flag 0 or 1 sets it (tests
 * compare both; on a CPU without AVX2 it stays 0) */
static PyObject *py_ans_simd(PyObject *self, PyObject *args) {
    int flag = -1;
    if (!PyArg_ParseTuple(args, "|i", &flag)) return NULL;
    if (ans_simd < 0) ans_simd_init();
#if ANS_HAVE_AVX2_CODE
    if (flag == 0) ans_simd = 0;
    else if (flag == 1) ans_simd = __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
    return PyLong_FromLong(ans_simd);
}

/* encode src[0:n] with frequencies f (present symbols of src all have f > 0) into dst; returns
 * the payload size, or 0 when it would not fit in cap bytes (the check is per round of lanes, so
 * a payload within 2 * lanes bytes of cap may be refused: a writer's decision, which only cap decides) */
/* the size ans_header will write for f */
static size_t ans_hlen(const uint32_t *f) {
    int nsym = 0; size_t hl = 3;
    for (int s = 0; s < 256; s++) if (f[s]) { nsym++; hl += f[s] < 128 ? 1 : f[s] < 16384 ? 2 : 3; }
    return hl + (nsym < 32 ? (size_t)nsym : 32);
}

typedef struct { uint64_t rcp; uint32_t xmax, cum, cmpl, sh; } encsym;

static void ans_enc_table(const uint32_t *f, int L, encsym *T) {
    uint32_t c = 0; const uint32_t M = 1u << L;
    for (int s = 0; s < 256; s++) {
        int l = 0;
        while (f[s] && (1u << l) < f[s]) l++;
        T[s].cum = c; c += f[s]; T[s].xmax = f[s];      /* emit when x >> (32 - L) >= f */
        T[s].cmpl = M - f[s];
        T[s].sh = (uint32_t)l; T[s].rcp = f[s] ? ((uint64_t)1 << (32 + l)) / f[s] + 1 : 0;
    }
}

/* An encoder's state for one plane: its table, lane states and output (words written down from
 * end; the header and the lane states go at dst, the words after them once done). x div f is
 * exact as q = (x * rcp) >> (32 + l), rcp = floor(2^(32 + l) / f) + 1, l = ceil(log2 f)
 * (Granlund and Montgomery 1994, theorem 4.2). (A division in double precision, exact too, ran
 * at 0.8x this with 4 lanes and was dropped.) */
typedef struct { encsym T[256]; uint32_t x[ANS_MAXLANES]; const uint8_t *src; uint8_t *dst, *p, *lim, *end;
                 size_t r, h, st; Py_ssize_t k; int hs; } ansslot;

/* encode one symbol (table entry t_) into lane state *x, its word (if it emits one) at *p - 2 */
static inline void ans_step1(uint32_t *x, uint8_t **p, const encsym *t_, int hs) {
    uint32_t xs = *x, emit = (xs >> hs) >= t_->xmax; uint16_t w16 = (uint16_t)xs;
    memcpy(*p - 2, &w16, 2); *p -= 2 * emit; xs >>= 16 * emit;
    uint32_t q = (uint32_t)((uint64_t)(((unsigned __int128)xs * t_->rcp) >> 32) >> t_->sh);
    *x = xs + t_->cum + q * t_->cmpl;
}

/* start encoding n symbols in `lanes` lanes into dst (cap bytes): the header, then the last,
 * partial round (lanes 0 .. n % lanes - 1); S->r symbols are left, in whole rounds. 0 where it
 * cannot fit. */
static int ans_slot_start(ansslot *S, const uint8_t *src, size_t n, int L, int mode, int lanes, const uint32_t *f,
                          uint8_t *dst, size_t cap) {
    if (cap < ans_hlen(f) + 6 * (size_t)lanes + 2) return 0;
    S->dst = dst; S->src = src; S->hs = 32 - L;
    S->st = ans_header(dst, L, mode, lanes, f); S->h = S->st + 4 * (size_t)lanes;
    ans_enc_table(f, L, S->T);
    for (int j = 0; j < lanes; j++) S->x[j] = ANS_LOW;
    S->end = S->p = dst + cap; S->lim = dst + S->h;
    size_t full = n - n % (size_t)lanes;
    for (size_t i = n; i > full; i--) {
        if (S->p - S->lim < 2) return 0;
        ans_step1(&S->x[i - 1 - full], &S->p, &S->T[src[i - 1]], S->hs);
    }
    S->r = full;
    return 1;
}

/* the remaining rounds, each refused unless two bytes a lane are free; then the words moved after
 * the header and the lane states: the payload's size, or 0 */
static size_t ans_slot_finish(ansslot *S, int lanes) {
    uint8_t *p = S->p; const uint8_t *src = S->src; const int hs = S->hs;
    for (size_t r = S->r; r > 0; r -= (size_t)lanes) {
        if (p - S->lim < 2 * (ptrdiff_t)lanes) return 0;
        for (int j = lanes - 1; j >= 0; j--) ans_step1(&S->x[j], &p, &S->T[src[r - (size_t)lanes + (size_t)j]], hs);
    }
    size_t words = (size_t)(S->end - p);
    memmove(S->dst + S->h, p, words);
    memcpy(S->dst + S->st, S->x, 4 * (size_t)lanes);
    return S->h + words;
}

static size_t ans_encode_c(const uint8_t *src, size_t n, int L, int mode, int lanes, const uint32_t *f, uint8_t *dst, size_t cap) {
    ansslot S;
    if (!ans_slot_start(&S, src, n, L, mode, lanes, f, dst, cap)) return 0;
#if ANS_HAVE_AVX2_CODE
    if (ans_simd == 1 && lanes % 8 == 0) {
        uint32_t fc[256];
        for (int s = 0; s < 256; s++) fc[s] = f[s] | S.T[s].cum << 16;
        uint8_t *q = ans_enc_rounds_avx2(src, S.r, lanes, L, S.x, fc, S.p, S.lim);
        if (!q) return 0;
        S.p = q; S.r = 0;
    }
#endif
    return ans_slot_finish(&S, lanes);
}

/* decode a payload's n symbols of alphabet size alpha (256: bytes, 16: nibbles) into dst: 0, or -1
 * when it is not a valid payload for them (-2: out of memory) */
static int ans_decode_syms(const uint8_t *src, size_t len, uint8_t *dst, size_t n, int alpha) {
    if (len < 3) return -1;
    int L = src[0] & 15, lanes = src[1], nsym = src[2] + 1;
    if (L < 1 || L > ANS_MAXLOG || lanes < 1 || lanes > ANS_MAXLANES || nsym > (1 << L) || nsym > alpha) return -1;
    size_t h = 3; uint8_t syms[256]; int k = 0;
    if (nsym < 32) {
        if (len < h + (size_t)nsym) return -1;
        for (int i = 0; i < nsym; i++) {
            syms[i] = src[h + i];
            if ((i && syms[i] <= syms[i - 1]) || syms[i] >= alpha) return -1;
        }
        h += (size_t)nsym;
    } else {
        if (len < h + 32) return -1;
        for (int s = 0; s < 256; s++) if (src[h + (s >> 3)] >> (s & 7) & 1) { if (k == nsym) return -1; syms[k++] = (uint8_t)s; }
        if (k != nsym) return -1;
        h += 32;
    }
    uint32_t f[256]; uint64_t total = 0;
    for (int i = 0; i < nsym; i++) {
        uint32_t v = 0; int sh = 0;
        for (;;) {
            if (h >= len || sh > 14) return -1;
            uint8_t b = src[h++];
            v |= (uint32_t)(b & 127) << sh; sh += 7;
            if (!(b & 128)) { if (b == 0 && sh > 7) return -1; break; }     /* minimal form only */
        }
        if (v == 0 || v > (1u << L)) return -1;
        f[i] = v; total += v;
    }
    if (total != (1ull << L) || len < h + 4 * (size_t)lanes || (len - h - 4 * (size_t)lanes) % 2) return -1;
    uint32_t M = 1u << L, mask = M - 1;
    uint32_t x[ANS_MAXLANES];
    for (int j = 0; j < lanes; j++) { memcpy(&x[j], src + h + 4 * (size_t)j, 4); if (x[j] < ANS_LOW) return -1; }
    const uint8_t *p = src + h + 4 * (size_t)lanes, *end = src + len;
    int bad = 0;
    if ((uint64_t)n * 4 < M) {          /* few bytes for a large table: search the cumulative frequencies instead
                                         * (so a chunk costs time in proportion to its size, whatever L) */
        uint32_t cumv[257]; cumv[0] = 0;
        for (int i = 0; i < nsym; i++) cumv[i + 1] = cumv[i] + f[i];
        for (size_t i = 0; i < n; i++) {
            int j = (int)(i % (size_t)lanes), lo = 0, hi = nsym - 1;
            uint32_t xs = x[j], sl = xs & mask;
            while (lo < hi) { int mid = (lo + hi + 1) / 2; if (cumv[mid] <= sl) lo = mid; else hi = mid - 1; }
            dst[i] = syms[lo];
            xs = f[lo] * (xs >> L) + sl - cumv[lo];
            if (xs < ANS_LOW) { if (p + 2 > end) return -1; xs = xs << 16 | (uint32_t)p[0] | (uint32_t)p[1] << 8; p += 2; }
            x[j] = xs;
        }
        if (p != end) return -1;
        for (int j = 0; j < lanes; j++) if (x[j] != ANS_LOW) return -1;
        return 0;
    }
    uint64_t *fb = malloc(8 * (size_t)M);         /* per slot: freq | (slot - cum) << 16 | symbol << 32 */
    if (!fb) return -2;
    for (uint32_t i = 0, c = 0; i < (uint32_t)nsym; c += f[i], i++)
        for (uint32_t t = 0; t < f[i]; t++) fb[c + t] = f[i] | t << 16 | (uint64_t)syms[i] << 32;
#define ANS_DEC(I, J) do { uint32_t xs = x[J], sl = xs & mask; uint64_t e_ = fb[sl]; dst[I] = (uint8_t)(e_ >> 32); \
        xs = (uint32_t)(e_ & 0xffff) * (xs >> L) + (uint32_t)((e_ >> 16) & 0xffff); \
        uint32_t need = xs < ANS_LOW, w_ = (uint32_t)p[0] | (uint32_t)p[1] << 8; \
        x[J] = (xs << (16 * need)) | (w_ & (0u - need)); p += 2 * need; } while (0)
    /* whole rounds run unchecked (and read p[0], p[1] even when not needed) while more than a
     * round's worth of words is left; the rest is checked symbol by symbol */
    size_t full = n - n % (size_t)lanes, r = 0;
    if (lanes == 32)                   /* the writer's lanes for large planes: a fixed count the compiler unrolls */
        for (; r < full && end - p >= 66; r += 32) {
#pragma GCC unroll 8
            for (int j = 0; j < 32; j++) ANS_DEC(r + (size_t)j, j);
        }
    for (; r < full && end - p >= 2 * (ptrdiff_t)lanes + 2; r += (size_t)lanes)
        for (int j = 0; j < lanes; j++) ANS_DEC(r + (size_t)j, j);
    for (size_t i = r; i < n; i++) {
        int j = (int)((i - r) % (size_t)lanes);
        uint32_t xs = x[j], sl = xs & mask; uint64_t e_ = fb[sl]; dst[i] = (uint8_t)(e_ >> 32);
        xs = (uint32_t)(e_ & 0xffff) * (xs >> L) + (uint32_t)((e_ >> 16) & 0xffff);
        if (xs < ANS_LOW) { if (p + 2 > end) { bad = 1; break; } xs = xs << 16 | (uint32_t)p[0] | (uint32_t)p[1] << 8; p += 2; }
        x[j] = xs;
    }
#undef ANS_DEC
    free(fb);
    if (bad || p != end) return -1;
    for (int j = 0; j < lanes; j++) if (x[j] != ANS_LOW) return -1;
    return 0;
}

/* decode a payload into the n bytes of a plane: 0, or -1 when it is not a valid payload for them
 * (-2: out of memory). The high half of byte 0 is the mode: 0, a symbol per byte; 1, a symbol per
 * nibble (2n symbols; symbol 2i is byte i's low nibble, 2i + 1 its high nibble). */
static int ans_decode_c(const uint8_t *src, size_t len, uint8_t *dst, size_t n) {
    if (len < 1) return -1;
    int mode = src[0] >> 4;
    if (mode == 0) return ans_decode_syms(src, len, dst, n, 256);
    if (mode != 1) return -1;
    uint8_t *t = malloc(2 * n + 1);
    if (!t) return -2;
    int r = ans_decode_syms(src, len, t, 2 * n, 16);
    if (r == 0) for (size_t i = 0; i < n; i++) dst[i] = (uint8_t)(t[2 * i] | t[2 * i + 1] << 4);
    free(t);
    return r;
}

/* lanes a writer uses for n symbols: one per 8 Ki symbols, a power of two, at most 32 */
static int ans_lanes(size_t n) {
    int l = 1;
    while (l < ANS_MAXLANES && (size_t)l * 2 * 8192 <= n) l *= 2;
    return l;
}

/* log2(v) in 16.16 fixed point, integers only (the same on every platform): the integer part,
 * then 16 fraction bits by repeated squaring of the normalized value */
static uint64_t ilog2_q16(uint32_t v) {
    int e = 31 - __builtin_clz(v);
    uint64_t m = ((uint64_t)v << 32) >> e, r = (uint64_t)e << 16;      /* m in [2^32, 2^33): 1.32 fixed point */
    for (int k = 15; k >= 0; k--) {
        m = (m >> 16) * (m >> 16);                                      /* (1.16)^2 -> 2.32 */
        if (m >= (1ull << 33)) { m >>= 1; r |= 1ull << k; }
    }
    return r;
}

/* the writer's policy: an ans payload of src when its estimated size is at least 3% under a
 * Huffman coding's (zstd's literals), or under the stored plane and at most 4 bits a byte, and it
 * has 2 or more symbols;
 * 0 otherwise (or when it does not fit in n bytes). The estimate is in fixed point (integers
 * only), so every platform decides alike. */
#define ANS_MIN_SYMBOLS 64

/* ilog2_q16 of 1 .. 2^ANS_LOG, the frequencies a table of ANS_LOG holds (filled at import) */
static uint64_t ilog2_tab[(1 << ANS_LOG) + 1];

static void ilog2_tab_init(void) {
    for (uint32_t v = 1; v <= (1u << ANS_LOG); v++) ilog2_tab[v] = ilog2_q16(v);
}

/* bits << 16 of a payload for symbols with counts cnt[0:alpha] (total n) and frequencies f */
static uint64_t ans_estimate_q16(const uint64_t *cnt, const uint32_t *f, int alpha, size_t n) {
    int nsym = 0, big = 0;
    uint64_t q = 0;
    for (int k = 0; k < alpha; k++) if (cnt[k]) {
        nsym++; big += f[k] >= 128;
        q += cnt[k] * (((uint64_t)ANS_LOG << 16) - (f[k] <= (1u << ANS_LOG) ? ilog2_tab[f[k]] : ilog2_q16(f[k])));
    }
    return q + ((uint64_t)(8 * (3 + (nsym < 32 ? nsym : 32) + nsym + big + 4 * ans_lanes(n))) << 16);
}

/* the nibble stream of n bytes: low nibble, then high, of each */
static void ans_nibbles(const uint8_t *src, size_t n, uint8_t *t) {
    for (size_t i = 0; i < n; i++) { t[2 * i] = src[i] & 15; t[2 * i + 1] = src[i] >> 4; }
}

/* The writer's choice for one plane (a payload of the ans codec, or nothing): the plan of what
 * to encode, or 0 where the plane is left to zstd. pl->tmp (the nibbles) is the caller's to free. */
typedef struct { const uint8_t *src; size_t nsym; int mode; uint32_t f[256]; uint8_t *tmp; } ansplan;

/* a plane's costs, bits << 16: an ans payload per byte (byte_q) or per nibble (nib_q), with their
 * frequency tables, and a Huffman coding of its bytes (huf_q, zstd's literals); nsym symbols */
typedef struct { uint64_t byte_q, nib_q, huf_q; int nsym; uint32_t f[256], fn[256]; } anscost;

static void ans_costs(const uint8_t *src, size_t n, anscost *c) {
    uint32_t cnt32[256]; uint64_t cnt[256], ncnt[256] = {0};
    hist4(src, n, cnt32);
    int nsym = 0, maxsym = 0;
    for (int k = 0; k < 256; k++) {
        cnt[k] = cnt32[k];
        ncnt[k & 15] += cnt[k]; ncnt[k >> 4] += cnt[k];
        if (cnt[k]) { nsym++; maxsym = k; }
    }
    c->nsym = nsym;
    if (nsym < 2) return;
    uint8_t hl[256];
    memset(c->fn, 0, sizeof c->fn);
    ans_normalize(cnt, n, ANS_LOG, c->f);
    ans_normalize(ncnt, 2 * (uint64_t)n, ANS_LOG, c->fn);
    huff_lengths(cnt32, maxsym, hl);
    c->byte_q = ans_estimate_q16(cnt, c->f, 256, n);
    c->nib_q = ans_estimate_q16(ncnt, c->fn, 16, 2 * n);
    c->huf_q = (uint64_t)(8 * (12 + nsym / 2)) << 16;
    for (int k = 0; k <= maxsym; k++) if (cnt[k]) c->huf_q += cnt[k] * ((uint64_t)hl[k] << 16);
}

/* worth trying where it beats a Huffman coding by 3%; or on planes of at most 4 bits a byte
 * (few symbols, where zstd's matches are spurious and cost more than Huffman literals: 1.47
 * bits a byte on a plane of two even symbols; and then it beats the stored plane). Denser
 * planes seldom gain and would cost the encoder's time (measured: benchmarks/bench_fixed_costs.py) */
static int ans_pays(const anscost *c, size_t n) {
    if (c->nsym < 2) return 0;                 /* (the costs are not computed then) */
    uint64_t ans_q = c->nib_q < c->byte_q ? c->nib_q : c->byte_q, raw_q = (uint64_t)(8 * n) << 16;
    return !(100 * ans_q > 97 * c->huf_q && 2 * ans_q > raw_q);
}

static int ans_plan_c(const uint8_t *src, size_t n, ansplan *pl) {
    pl->tmp = NULL;
    if (n < ANS_MIN_SYMBOLS || n > 0x7fffffffu) return 0;
    anscost c;
    ans_costs(src, n, &c);
    if (!ans_pays(&c, n)) return 0;
    if (c.nib_q >= c.byte_q) { pl->src = src; pl->nsym = n; pl->mode = 0; memcpy(pl->f, c.f, sizeof c.f); return 1; }
    if (!(pl->tmp = malloc(2 * n))) return 0;
    ans_nibbles(src, n, pl->tmp);
    pl->src = pl->tmp; pl->nsym = 2 * n; pl->mode = 1; memcpy(pl->f, c.fn, sizeof c.fn);
    return 1;
}

static size_t ans_try_c(const uint8_t *src, size_t n, uint8_t *dst, size_t cap) {
    ansplan pl;
    if (!ans_plan_c(src, n, &pl)) return 0;
    if (cap > n) cap = n;                                   /* never more than the plane */
    size_t r = ans_encode_c(pl.src, pl.nsym, ANS_LOG, pl.mode, ans_lanes(pl.nsym), pl.f, dst, cap);
    free(pl.tmp);
    return r;
}

/* ans_try_c over many planes, with the encodes of one and two lanes (planes under 32 Ki symbols:
 * most of a delta's) run two planes at a time in step: a lane's state chain is bound by the
 * division's latency, and the planes' chains overlap (more planes at a time measured no faster:
 * the states no longer fit in registers). The same bytes as one at a time: a slot
 * runs in step only while every slot has ANS_STEP rounds left and room for them, and otherwise
 * finishes its plane with ans_encode_c's own loop and checks. out[i]: payload size at dst[i], or 0. */
#define ANS_STEP 128

/* plane k of the plans into a slot: 1, or 0 (out[k] = 0) where it cannot start */
static int ans_slot_load(ansslot *S, const ansplan *pl, Py_ssize_t k, int lanes, uint8_t *const *dst, const size_t *cap,
                         size_t *out) {
    S->k = k;
    if (ans_slot_start(S, pl[k].src, pl[k].nsym, ANS_LOG, pl[k].mode, lanes, pl[k].f, dst[k], cap[k])) return 1;
    out[k] = 0;
    return 0;
}

#define ANS_FITS(S_, LANES) ((S_).r >= (size_t)(LANES) * ANS_STEP && (S_).p - (S_).lim >= 2 * (LANES) * ANS_STEP + 2 * (LANES))
/* the planes idx[0 .. m-1] (each of LANES lanes), NS slots in step */
#define ANS_MACHINE(LANES, NS) \
static void ans_machine##LANES(const ansplan *pl, const Py_ssize_t *idx, Py_ssize_t m, uint8_t *const *dst, \
                               const size_t *cap, size_t *out) { \
    ansslot *S = malloc(NS * sizeof(ansslot)); int live = 0; Py_ssize_t next = 0; \
    if (!S) { for (Py_ssize_t i = 0; i < m; i++) { Py_ssize_t k = idx[i]; \
        out[k] = ans_encode_c(pl[k].src, pl[k].nsym, ANS_LOG, pl[k].mode, LANES, pl[k].f, dst[k], cap[k]); } return; } \
    while (live < NS && next < m) live += ans_slot_load(&S[live], pl, idx[next++], LANES, dst, cap, out); \
    while (live == NS) { \
        int fit = 1; \
        for (int s = 0; s < NS; s++) fit &= ANS_FITS(S[s], LANES); \
        if (fit) { \
            uint32_t x[NS][LANES]; uint8_t *p[NS]; const uint8_t *src[NS]; \
            for (int s = 0; s < NS; s++) { \
                for (int j = 0; j < LANES; j++) x[s][j] = S[s].x[j]; \
                p[s] = S[s].p; src[s] = S[s].src + S[s].r; } \
            for (int b = 1; b <= ANS_STEP; b++) \
                for (int j = LANES - 1; j >= 0; j--) \
                    for (int s = 0; s < NS; s++) \
                        ans_step1(&x[s][j], &p[s], &S[s].T[src[s][j - (ptrdiff_t)(LANES) * b]], 32 - ANS_LOG); \
            for (int s = 0; s < NS; s++) { \
                for (int j = 0; j < LANES; j++) S[s].x[j] = x[s][j]; \
                S[s].p = p[s]; S[s].r -= (size_t)(LANES) * ANS_STEP; } \
            continue; \
        } \
        for (int s = 0; s < live; s++) \
            if (!ANS_FITS(S[s], LANES)) { \
                out[S[s].k] = ans_slot_finish(&S[s], LANES); \
                int got = 0; \
                while (!got && next < m) got = ans_slot_load(&S[s], pl, idx[next++], LANES, dst, cap, out); \
                if (!got) { S[s] = S[--live]; s--; } \
            } \
    } \
    for (int s = 0; s < live; s++) out[S[s].k] = ans_slot_finish(&S[s], LANES); \
    free(S); \
}
ANS_MACHINE(1, 2)
ANS_MACHINE(2, 2)

static void ans_encode_planes(Py_ssize_t N, const uint8_t *const *src, const size_t *n, uint8_t *const *dst,
                              const size_t *cap, size_t *out) {
    ansplan *pl = malloc((size_t)(N + 1) * sizeof(ansplan));
    Py_ssize_t *idx = malloc((size_t)(2 * N + 2) * sizeof(Py_ssize_t)), m1 = 0, m2 = 0;
    size_t *c = malloc((size_t)(N + 1) * sizeof(size_t));
    if (!pl || !idx || !c) {                        /* (out of memory: one at a time) */
        for (Py_ssize_t k = 0; k < N; k++) out[k] = ans_try_c(src[k], n[k], dst[k], cap[k]);
        free(pl); free(idx); free(c); return;
    }
    Py_ssize_t *i1 = idx, *i2 = idx + N + 1;
    for (Py_ssize_t k = 0; k < N; k++) {
        out[k] = 0; c[k] = cap[k] < n[k] ? cap[k] : n[k];  /* never more than the plane */
        if (!ans_plan_c(src[k], n[k], &pl[k])) { pl[k].nsym = 0; continue; }
        int lanes = ans_lanes(pl[k].nsym);
        if (lanes == 1) i1[m1++] = k;
        else if (lanes == 2) i2[m2++] = k;
        else out[k] = ans_encode_c(pl[k].src, pl[k].nsym, ANS_LOG, pl[k].mode, lanes, pl[k].f, dst[k], c[k]);
    }
    ans_machine1(pl, i1, m1, dst, c, out);
    ans_machine2(pl, i2, m2, dst, c, out);
    for (Py_ssize_t k = 0; k < N; k++) if (pl[k].nsym) free(pl[k].tmp);
    free(pl); free(idx); free(c);
}

static PyObject *ans_encode(PyObject *self, PyObject *args) {
    Py_buffer s, o; int L = 0, lanes = 0, nib = 0; size_t r = 0; int bad = 0;
    if (!PyArg_ParseTuple(args, "y*w*|iip", &s, &o, &L, &lanes, &nib)) return NULL;
    if (L && (L < 1 || L > ANS_MAXLOG || lanes < 1 || lanes > ANS_MAXLANES)) bad = 1;
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        if (!L) r = ans_try_c(s.buf, (size_t)s.len, o.buf, (size_t)o.len);
        else {
            size_t m = (size_t)s.len * (nib ? 2 : 1);
            uint8_t *t = nib ? malloc(m + 1) : (uint8_t *)s.buf;
            if (t) {
                uint64_t cnt[256] = {0}; uint32_t f[256]; int nsym = 0;
                if (nib) ans_nibbles(s.buf, (size_t)s.len, t);
                for (size_t i = 0; i < m; i++) cnt[t[i]]++;
                for (int k = 0; k < 256; k++) nsym += cnt[k] != 0;
                if (m && nsym <= (1 << L)) { ans_normalize(cnt, (uint64_t)m, L, f); r = ans_encode_c(t, m, L, nib, lanes, f, o.buf, (size_t)o.len); }
                if (nib) free(t);
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&s); PyBuffer_Release(&o);
    if (bad) { PyErr_SetString(PyExc_ValueError, "bad table log or lanes"); return NULL; }
    return PyLong_FromSize_t(r);
}

/* coded_estimate(planes, store_bits, sample) -> estimated bytes of the planes as a delta entry's
 * planes are coded (codecs.ChunkCoder.encode with use_ans): 0 for an empty plane; the plane's size
 * where the gate stores it (256 bytes or more, sampled entropy above store_bits); 19 bytes for a
 * plane of one symbol (zstd's frame of one RLE block); otherwise the least of the stored plane, a
 * Huffman coding of it (zstd's literals, matches not counted) and the ans payload where ans_pays.
 * For choosing a coding by its size without coding it (deltaplan's trial). */
#define ZSTD_RLE_FRAME 19

static size_t coded_estimate_c(const uint8_t *src, size_t n, double store_bits, Py_ssize_t sample) {
    if (n == 0 || n > 0x7fffffffu) return n;
    Py_ssize_t step = (Py_ssize_t)n / sample;
    if (n >= 256 && entropy_c(src, (Py_ssize_t)n, step > 1 ? step : 1) > store_bits) return n;
    anscost c;
    ans_costs(src, n, &c);
    if (c.nsym < 2) return n < ZSTD_RLE_FRAME ? n : ZSTD_RLE_FRAME;
    uint64_t best = c.huf_q;
    if (n >= ANS_MIN_SYMBOLS && ans_pays(&c, n)) {
        uint64_t a = c.nib_q < c.byte_q ? c.nib_q : c.byte_q;
        if (a < best) best = a;
    }
    size_t bytes = (size_t)((best >> 16) + 7) / 8;
    return bytes < n ? bytes : n;
}

static PyObject *coded_estimate(PyObject *self, PyObject *args) {
    PyObject *lst; double store_bits; Py_ssize_t sample;
    if (!PyArg_ParseTuple(args, "Odn", &lst, &store_bits, &sample)) return NULL;
    if (sample < 1) { PyErr_SetString(PyExc_ValueError, "sample must be >= 1"); return NULL; }
    PyObject *seq = PySequence_Tuple(lst);     /* a copy: another thread may change a list while the GIL is released */
    if (!seq) return NULL;
    Py_ssize_t N = PyTuple_GET_SIZE(seq);
    size_t total = 0;
    for (Py_ssize_t i = 0; i < N; i++) {
        Py_buffer b;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(seq, i), &b, PyBUF_SIMPLE) < 0) { Py_DECREF(seq); return NULL; }
        size_t r;
        Py_BEGIN_ALLOW_THREADS
        r = coded_estimate_c(b.buf, (size_t)b.len, store_bits, sample);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&b);
        total += r;
    }
    Py_DECREF(seq);
    return PyLong_FromSize_t(total);
}

/* ans_encode_many(planes, out, rec) -> bytes of out used: ans_try_c for each plane of the list,
 * payloads one after the other in out; rec (int64, 2 per plane) gets (offset, size), size 0
 * where ans does not pay. One release of the GIL. */
static PyObject *ans_encode_many(PyObject *self, PyObject *args) {
    PyObject *lst; Py_buffer o, rec;
    if (!PyArg_ParseTuple(args, "O!w*w*", &PyList_Type, &lst, &o, &rec)) return NULL;
    Py_ssize_t N = PyList_GET_SIZE(lst), got = 0; size_t pos = 0;
    Py_buffer *v = PyMem_Calloc(N + 1, sizeof(Py_buffer));
    if (!v) { PyBuffer_Release(&o); PyBuffer_Release(&rec); return PyErr_NoMemory(); }
    for (; got < N; got++) if (PyObject_GetBuffer(PyList_GET_ITEM(lst, got), &v[got], PyBUF_C_CONTIGUOUS) < 0) break;
    int ok = got == N && rec.len >= N * 16 && (uintptr_t)rec.buf % 8 == 0;
    const uint8_t **sp = NULL; uint8_t **dp = NULL; size_t *np_ = NULL, *cp = NULL, *out = NULL;
    if (ok) {
        sp = PyMem_Malloc((N + 1) * sizeof *sp); dp = PyMem_Malloc((N + 1) * sizeof *dp);
        np_ = PyMem_Malloc((N + 1) * sizeof *np_); cp = PyMem_Malloc((N + 1) * sizeof *cp); out = PyMem_Malloc((N + 1) * sizeof *out);
        if (!sp || !dp || !np_ || !cp || !out) ok = -1;
    }
    if (ok == 1) {
        int64_t *R = rec.buf;
        for (Py_ssize_t i = 0; i < N; i++) {       /* plane i's payload goes at its own offset: the planes before it */
            size_t room = (size_t)o.len > pos ? (size_t)o.len - pos : 0;
            sp[i] = v[i].buf; np_[i] = (size_t)v[i].len; dp[i] = (uint8_t *)o.buf + (room ? pos : 0); cp[i] = room;
            R[2 * i] = (int64_t)(room ? pos : 0);
            pos += room < np_[i] ? room : np_[i];
        }
        Py_BEGIN_ALLOW_THREADS
        ans_encode_planes(N, sp, np_, dp, cp, out);
        Py_END_ALLOW_THREADS
        pos = 0;
        for (Py_ssize_t i = 0; i < N; i++) {
            R[2 * i + 1] = (int64_t)out[i];
            if (out[i] && (size_t)R[2 * i] + out[i] > pos) pos = (size_t)R[2 * i] + out[i];
        }
    }
    PyMem_Free(sp); PyMem_Free(dp); PyMem_Free(np_); PyMem_Free(cp); PyMem_Free(out);
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&v[i]);
    PyMem_Free(v); PyBuffer_Release(&o); PyBuffer_Release(&rec);
    if (ok < 0) return PyErr_NoMemory();
    if (!ok) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "rec too small"); return NULL; }
    return PyLong_FromSize_t(pos);
}

/* ans_decode_many(pairs) -> index of the first payload that does not decode, or -1: each pair
 * (payload, out) decoded into all of out. One release of the GIL. */
static PyObject *ans_decode_many(PyObject *self, PyObject *args) {
    PyObject *lst;
    if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &lst)) return NULL;
    Py_ssize_t N = PyList_GET_SIZE(lst), got = 0, bad = -1; int oom = 0;
    Py_buffer *v = PyMem_Calloc(2 * N + 2, sizeof(Py_buffer));
    if (!v) return PyErr_NoMemory();
    for (; got < N; got++) {
        PyObject *t = PyList_GET_ITEM(lst, got);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2) { PyErr_SetString(PyExc_TypeError, "(payload, out) pairs"); break; }
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(t, 0), &v[2 * got], PyBUF_C_CONTIGUOUS) < 0) break;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(t, 1), &v[2 * got + 1], PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
            PyBuffer_Release(&v[2 * got]); break;
        }
    }
    if (got == N) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < N; i++) {
            int r = ans_decode_c(v[2 * i].buf, (size_t)v[2 * i].len, v[2 * i + 1].buf, (size_t)v[2 * i + 1].len);
            if (r == -2) { oom = 1; break; }
            if (r < 0) { bad = i; break; }
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < got; i++) { PyBuffer_Release(&v[2 * i]); PyBuffer_Release(&v[2 * i + 1]); }
    PyMem_Free(v);
    if (got != N) return NULL;
    if (oom) return PyErr_NoMemory();
    return PyLong_FromSsize_t(bad);
}

static PyMethodDef methods[] = {
    {"decode_many", decode_many, METH_VARARGS, "decode_many([argument tuples of decode_units]) -> [results], one GIL release"},
    {"encode_many", encode_many, METH_VARARGS, "encode_many([argument tuples of encode_units]) -> [arena bytes used], one GIL release"},
    {"coded_estimate", coded_estimate, METH_VARARGS, "coded_estimate(planes, store_bits, sample) -> estimated coded bytes of the planes"},
    {"encode_units", encode_units, METH_VARARGS, "encode_units(...) -> arena bytes used: split, gate, Huffman and digests of a run of units"},
    {"decode_units", decode_units, METH_VARARGS, "decode_units(...) -> -1 or a bad unit: merge, delta inverse and digests of a run of units"},
    {"masked_split", masked_split, METH_VARARGS, "masked_split(src, itemsize, mask_out, planes) -> nnz"},
    {"masked_merge", masked_merge, METH_VARARGS, "masked_merge(mask, planes, nnz, itemsize, out) -> 0 or -1"},
    {"huff_frame", huff_frame, METH_VARARGS, "huff_frame(src, dst) -> size of a literals-only zstd frame in dst, or 0"},
    {"xxh64", py_xxh64, METH_VARARGS, "xxh64(buf, seed=0) -> int, GIL released"},
    {"xxh64_simd", py_xxh64_simd, METH_VARARGS, "xxh64_simd(flag=-1) -> 1 when the AVX-512 stripe loop is on; 0/1 turns it off/on"},
    {"entropy", entropy, METH_VARARGS, "entropy(buf, step) -> bits per byte of a strided sample"},
    {"hist", py_hist, METH_VARARGS, "hist(buf) -> [256 byte counts]"},
    {"hist_simd", py_hist_simd, METH_VARARGS, "hist_simd(flag=-1) -> 1 when the vector byte histogram is on"},
    {"split", split, METH_VARARGS, "split(src, itemsize, exp_bits, man_bits, planes)"},
    {"merge", merge, METH_VARARGS, "merge(planes, itemsize, exp_bits, man_bits, out)"},
    {"delta", delta, METH_VARARGS, "delta(x, base, out, itemsize, op, is_float, inverse)"},
    {"ctx", ctx, METH_VARARGS, "ctx(x, base, out, itemsize, op, is_float, inverse, s, w, counts_out=None, offsets=None, row_bytes=0, digests=None, keep=None)"},
    {"unit_hist", unit_hist, METH_VARARGS, "unit_hist(src, itemsize, units, masked, hist_out, nnz_out): byte histograms per unit of elements"},
    {"ctx_hist", ctx_hist, METH_VARARGS, "ctx_hist(base, itemsize, s, w, counts_out)"},
    {"ctxm", ctxm, METH_VARARGS, "ctxm(x, base, bitmap, vals, itemsize, op, is_float, s, w, nsorted, offsets, counts, row_bytes=0, digests=None, keep=None)"},
    {"ctxm_cum", ctxm_cum, METH_VARARGS, "ctxm_cum(bitmap, nsorted, cum)"},
    {"ctxm_inverse", ctxm_inverse, METH_VARARGS, "ctxm_inverse(base, out, bitmap, vals, cum, itemsize, op, is_float, s, w, nsorted, offsets, counts)"},
    {"masked_delta_split", py_masked_delta_split, METH_VARARGS, "masked_delta_split(x, base, itemsize, op, is_float, mask_out, planes) -> nnz: the masked split of delta(x, base) in one pass"},
    {"masked_merge_delta", py_masked_merge_delta, METH_VARARGS, "masked_merge_delta(mask, planes, nnz, itemsize, op, is_float, base, out) -> the mask's set bits: the inverse of masked_delta_split in one pass"},
    {"msplit_simd", py_msplit_simd, METH_VARARGS, "msplit_simd(flag=-1) -> 1 when the AVX-512 masked delta split is on; 0/1 turns it off/on"},
    {"ctxm_simd", py_ctxm_simd, METH_VARARGS, "ctxm_simd(flag=-1) -> 1 when the AVX-512 ctxm move is on; 0/1 turns it off/on"},
    {"ans_encode", ans_encode, METH_VARARGS, "ans_encode(src, out, L=0, lanes=0, nibbles=False) -> payload size or 0 (L=0: the writer's policy)"},
    {"ans_encode_many", ans_encode_many, METH_VARARGS, "ans_encode_many(planes, out, rec) -> extent used; rec gets (offset, size) per plane, each plane's payload at the offset of the planes before it"},
    {"ans_simd", py_ans_simd, METH_VARARGS, "ans_simd(flag=-1) -> 1 when the AVX2 ans encoder is on; 0/1 turns it off/on"},
    {"ans_decode_many", ans_decode_many, METH_VARARGS, "ans_decode_many([(payload, out)]) -> -1 or the first bad pair"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_accel", "mithril CPU fast paths", -1, methods};

PyMODINIT_FUNC PyInit__accel(void) { ans_simd_init(); ctxm_simd_init(); msplit_simd_init(); xxh64_simd_init(); ilog2_tab_init(); return PyModule_Create(&mod); }
