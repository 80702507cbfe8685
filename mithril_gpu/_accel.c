/* Optional fast paths for the CPU backend. Each function computes exactly what the numpy
 * reference in transforms.py / delta.py defines (tests compare them byte for byte) and
 * releases the GIL, so the writer's and reader's threads run it in parallel.
 * Element bytes are little-endian; this file assumes a little-endian host (checked at import). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAXP 8

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
static void bytegroup_split(const uint8_t *restrict s, Py_ssize_t n, int isz, Py_buffer *p) {
    if (isz == 2) { uint8_t *restrict a = p[0].buf, *restrict b = p[1].buf;
        for (Py_ssize_t i = 0; i < n; i++) { a[i] = s[2*i]; b[i] = s[2*i+1]; } }
    else if (isz == 4) { uint8_t *restrict a = p[0].buf, *restrict b = p[1].buf, *restrict c = p[2].buf, *restrict d = p[3].buf;
        for (Py_ssize_t i = 0; i < n; i++) { a[i] = s[4*i]; b[i] = s[4*i+1]; c[i] = s[4*i+2]; d[i] = s[4*i+3]; } }
    else for (int k = 0; k < isz; k++) { uint8_t *restrict a = p[k].buf;
        for (Py_ssize_t i = 0; i < n; i++) a[i] = s[isz*i+k]; }
}

static void split16(const uint8_t *restrict s, Py_ssize_t n, int e, int m,
                    uint8_t *restrict ex, uint8_t *restrict r0, uint8_t *restrict r1) {
    const uint16_t *restrict x = (const uint16_t *)s;
    const uint16_t emask = (1u << e) - 1, mmask = (1u << m) - 1;
    if (!r1) for (Py_ssize_t i = 0; i < n; i++) { uint16_t v = x[i];
        ex[i] = (uint8_t)((v >> m) & emask); r0[i] = (uint8_t)(((v >> 15) << m) | (v & mmask)); }
    else for (Py_ssize_t i = 0; i < n; i++) { uint16_t v = x[i];
        uint16_t r = (uint16_t)(((v >> 15) << m) | (v & mmask));
        ex[i] = (uint8_t)((v >> m) & emask); r0[i] = (uint8_t)r; r1[i] = (uint8_t)(r >> 8); }
}

static void split32(const uint8_t *restrict s, Py_ssize_t n, int e, int m, int nr, Py_buffer *p) {
    const uint32_t *restrict x = (const uint32_t *)s;
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
    uint8_t *o = out.buf;
    Py_BEGIN_ALLOW_THREADS
    if (!e) {
        if (isz == 2) { const uint8_t *a = p[0].buf, *b = p[1].buf;
            for (Py_ssize_t i = 0; i < n; i++) { o[2*i] = a[i]; o[2*i+1] = b[i]; } }
        else if (isz == 4) { const uint8_t *a = p[0].buf, *b = p[1].buf, *c = p[2].buf, *d = p[3].buf;
            for (Py_ssize_t i = 0; i < n; i++) { o[4*i] = a[i]; o[4*i+1] = b[i]; o[4*i+2] = c[i]; o[4*i+3] = d[i]; } }
        else for (int k = 0; k < isz; k++) { const uint8_t *a = p[k].buf;
            for (Py_ssize_t i = 0; i < n; i++) o[isz*i+k] = a[i]; }
    } else if (isz == 2) {
        uint16_t *x = (uint16_t *)o; const uint8_t *ex = p[0].buf, *r0 = p[1].buf;
        const uint8_t *r1 = np_ == 3 ? p[2].buf : NULL; uint16_t mmask = (1u << m) - 1;
        for (Py_ssize_t i = 0; i < n; i++) { uint16_t r = r0[i] | (r1 ? (uint16_t)r1[i] << 8 : 0);
            x[i] = (uint16_t)(((r >> m) << 15) | ((uint16_t)ex[i] << m) | (r & mmask)); }
    } else {
        uint32_t *x = (uint32_t *)o; const uint8_t *ex = p[0].buf; int nr = np_ - 1;
        uint32_t mmask = (1u << m) - 1;
        for (Py_ssize_t i = 0; i < n; i++) { uint32_t r = 0;
            for (int k = 0; k < nr; k++) r |= (uint32_t)((const uint8_t *)p[1+k].buf)[i] << (8*k);
            x[i] = ((r >> m) << 31) | ((uint32_t)ex[i] << m) | (r & mmask); }
    }
    Py_END_ALLOW_THREADS
    release(p, np_); PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

/* delta(x, base, out, itemsize, op, is_float, inverse)
 * op 0 xor: d = x ^ b.  op 1 zigzag: d = zz(key(x) - key(b)), key = order-preserving float
 * key when is_float (x ^ (sign ? all ones : sign bit)), identity otherwise. */
#define DELTA_T(T, BITS) do { \
    const T *X = (const T *)xs.buf, *B = (const T *)bs.buf; T *O = (T *)os.buf; \
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

/* entropy(buf, step): order-0 entropy in bits per byte of buf[0], buf[step], buf[2*step], ... */
static PyObject *entropy(PyObject *self, PyObject *args) {
    Py_buffer b; Py_ssize_t step;
    if (!PyArg_ParseTuple(args, "y*n", &b, &step)) return NULL;
    if (step < 1) step = 1;
    double h = 0.0;
    Py_BEGIN_ALLOW_THREADS
    uint32_t counts[256] = {0};
    const uint8_t *s = b.buf; Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < b.len; i += step) { counts[s[i]]++; total++; }
    for (int k = 0; k < 256; k++) if (counts[k]) { double q = (double)counts[k] / total; h -= q * __builtin_log2(q); }
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

static uint64_t xxh64(const uint8_t *p, size_t len, uint64_t seed) {
    const uint8_t *end = p + len; uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t *limit = end - 32;
        do { v1 = xround(v1, rd64(p)); v2 = xround(v2, rd64(p + 8));
             v3 = xround(v3, rd64(p + 16)); v4 = xround(v4, rd64(p + 24)); p += 32; } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xmerge(h, v1); h = xmerge(h, v2); h = xmerge(h, v3); h = xmerge(h, v4);
    } else h = seed + P5;
    h += (uint64_t)len;
    while (p + 8 <= end) { h ^= xround(0, rd64(p)); h = rotl64(h, 27) * P1 + P4; p += 8; }
    if (p + 4 <= end) { h ^= (uint64_t)rd32(p) * P1; h = rotl64(h, 23) * P2 + P3; p += 4; }
    while (p < end) { h ^= (*p) * P5; h = rotl64(h, 11) * P1; p++; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
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

static PyMethodDef methods[] = {
    {"xxh64", py_xxh64, METH_VARARGS, "xxh64(buf, seed=0) -> int, GIL released"},
    {"entropy", entropy, METH_VARARGS, "entropy(buf, step) -> bits per byte of a strided sample"},
    {"split", split, METH_VARARGS, "split(src, itemsize, exp_bits, man_bits, planes)"},
    {"merge", merge, METH_VARARGS, "merge(planes, itemsize, exp_bits, man_bits, out)"},
    {"delta", delta, METH_VARARGS, "delta(x, base, out, itemsize, op, is_float, inverse)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_accel", "mithril CPU fast paths", -1, methods};

PyMODINIT_FUNC PyInit__accel(void) { return PyModule_Create(&mod); }
