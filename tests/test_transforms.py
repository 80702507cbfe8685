"""The numpy reference transforms, their exact plane bytes, and the C helper against them."""
import os

import numpy as np
import pytest

import mithril_gpu
from mithril_gpu import cpu, ctxdelta, delta, dtypes, transforms

CASES = [(dt, tr) for dt in dtypes.BY_NAME.values() for tr in transforms.TRANSFORMS
         if transforms.valid_for(dt, tr) and tr != "masked"]


@pytest.mark.parametrize("dt,tr", CASES, ids=[f"{d.name}-{t}" for d, t in CASES])
def test_reference_round_trip(dt, tr):
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 1001 * dt.itemsize, dtype=np.uint8)
    planes = [np.empty(1001 * w, np.uint8) for w in transforms.plane_widths(dt, tr)]
    transforms.split(dt, tr, src, planes)
    out = np.zeros_like(src)
    transforms.merge(dt, tr, planes, out)
    assert out.tobytes() == src.tobytes()


def test_bf16_fieldsplit_planes_are_exact():
    # 1.0 = 0x3F80 (exponent 127, mantissa 0); -2.5 = 0xC020 (sign, exponent 128, mantissa 0x20)
    src = np.array([0x3F80, 0xC020, 0x0001, 0xFFFF], dtype="<u2").view(np.uint8)
    dt = dtypes.BY_NAME["BF16"]
    planes = [np.empty(4, np.uint8) for _ in range(2)]
    transforms.split(dt, "fieldsplit", src, planes)
    assert planes[0].tolist() == [127, 128, 0, 255]
    assert planes[1].tolist() == [0x00, 0x80 | 0x20, 0x01, 0xFF]


def test_f32_fieldsplit_and_bytegroup_planes_are_exact():
    dt = dtypes.BY_NAME["F32"]
    src = np.array([1.0, -3.0], dtype="<f4").view(np.uint8)   # 0x3F800000, 0xC0400000
    planes = [np.empty(2, np.uint8) for _ in range(4)]
    transforms.split(dt, "fieldsplit", src, planes)
    assert [p.tolist() for p in planes] == [[127, 128], [0, 0], [0, 0], [0, 0x80 | 0x40]]
    transforms.split(dt, "bytegroup", src, planes)
    assert [p.tolist() for p in planes] == [[0, 0], [0, 0], [0x80, 0x40], [0x3F, 0xC0]]


def test_the_c_helper_is_built():
    """setup.py builds the C helper as optional, so that an install never fails for want of it;
    this suite must not be as lenient: a build that failed would skip every C test silently.
    MITHRIL_ALLOW_NO_ACCEL=1 runs the suite on the numpy reference alone."""
    if os.environ.get("MITHRIL_ALLOW_NO_ACCEL") == "1":
        pytest.skip("MITHRIL_ALLOW_NO_ACCEL=1")
    assert cpu._accel is not None, "mithril_gpu._accel did not build (python setup.py build_ext --inplace says why)"


@pytest.mark.skipif(cpu._accel is None, reason="C helper not built")
@pytest.mark.parametrize("dt,tr", [c for c in CASES if c[1] != "raw"], ids=lambda v: getattr(v, "name", v))
def test_accel_planes_equal_reference(dt, tr):
    rng = np.random.default_rng(5)
    for n in (1, 7, 4099):
        src = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
        ref = [np.empty(n * w, np.uint8) for w in transforms.plane_widths(dt, tr)]
        fast = [np.full(n * w, 0xAA, np.uint8) for w in transforms.plane_widths(dt, tr)]
        transforms.split(dt, tr, src, ref)
        cpu.split_planes(dt, tr, src, fast)
        assert [p.tobytes() for p in fast] == [p.tobytes() for p in ref]
        out = np.zeros_like(src)
        cpu.merge_planes(dt, tr, ref, out)
        assert out.tobytes() == src.tobytes()


@pytest.mark.parametrize("dt", list(dtypes.BY_NAME.values()), ids=lambda d: d.name)
@pytest.mark.parametrize("op", delta.OPS)
def test_delta_reference_round_trip_and_accel(dt, op):
    rng = np.random.default_rng(7)
    n = 3000 * dt.itemsize
    x = rng.integers(0, 256, n, dtype=np.uint8)
    b = x.copy()
    b[::5] = rng.integers(0, 256, b[::5].size, dtype=np.uint8)
    d = np.empty_like(x)
    delta.encode(op, dt, x, b, d)
    back = np.empty_like(x)
    delta.decode(op, dt, d, b, back)
    assert back.tobytes() == x.tobytes()
    if cpu._accel is not None:
        fast = np.empty_like(x)
        cpu.delta_apply(op, dt, x, b, fast, inverse=False)
        assert fast.tobytes() == d.tobytes()


def test_zigzag_of_nearby_floats_is_small():
    dt = dtypes.BY_NAME["BF16"]
    import torch

    y = torch.tensor([1.0, -1.0, 0.0, -0.0, 3.0], dtype=torch.bfloat16)
    x = torch.tensor([1.0078125, -1.0078125, -0.0, 0.0, 3.0], dtype=torch.bfloat16)  # one ulp away, or equal
    d = np.empty(10, np.uint8)
    delta.encode("zigzag", dt, x.view(torch.uint8).numpy(), y.view(torch.uint8).numpy(), d)
    codes = d.view("<u2").tolist()
    assert codes == [2, 1, 1, 2, 0]   # +1 -> 2, -1 -> 1 (ordered by value), +0/-0 are neighbours


@pytest.mark.skipif(cpu._accel is None, reason="C helper not built")
def test_accel_xxh64_equals_xxhash():
    import xxhash

    rng = np.random.default_rng(11)
    data = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    # the scalar stripe loop and (where the CPU has AVX-512 DQ/VL) the vector one, at odd offsets too
    modes = [0] + ([1] if cpu._accel.xxh64_simd(1) else [])
    try:
        for mode in modes:
            cpu._accel.xxh64_simd(mode)
            for off in (0, 1, 7):
                for n in list(range(0, 70)) + [95, 96, 97, 255, 256, 1000, 4999, 5000, 262_144, 299_993]:
                    for seed in (0, 1, 2**64 - 1):
                        got = cpu._accel.xxh64(data[off:off + n], seed)
                        assert got == xxhash.xxh64_intdigest(data[off:off + n], seed), (mode, off, n, seed)
    finally:
        cpu._accel.xxh64_simd(1)


@pytest.mark.parametrize("dt", list(dtypes.BY_NAME.values()), ids=lambda d: d.name)
def test_masked_planes_are_exact_and_round_trip(dt):
    rng = np.random.default_rng(13)
    n = 1003
    x = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8).reshape(n, dt.itemsize)
    x[rng.random(n) < 0.7] = 0                        # 70% zero elements
    if dt.name == "BOOL":
        x = (x != 0).astype(np.uint8)
    src = x.reshape(-1)
    nnz, planes = transforms.split_masked(dt, src)
    nonzero = np.any(x != 0, axis=1)
    assert nnz == int(nonzero.sum())
    assert transforms.plane_sizes(dt, "masked", n, nnz) == [p.size for p in planes]
    assert planes[0].tobytes() == np.packbits(nonzero, bitorder="little").tobytes()
    for k in range(dt.itemsize):
        assert planes[1 + k].tobytes() == x[nonzero, k].tobytes()
    out = np.full_like(src, 0x5A)
    transforms.merge_masked(dt, planes, out)
    assert out.tobytes() == src.tobytes()


def test_masked_refuses_a_mask_that_disagrees_with_its_planes():
    dt = dtypes.BY_NAME["I32"]
    src = np.array([0, 5, 0, 7], dtype="<i4").view(np.uint8)
    nnz, planes = transforms.split_masked(dt, src)
    planes[0] = np.array([0b1111], np.uint8)
    with pytest.raises(ValueError, match="nonzero"):
        transforms.merge_masked(dt, planes, np.empty_like(src))


@pytest.mark.skipif(cpu._accel is None, reason="C helper not built")
def test_literal_frames_decode_with_libzstd_exactly():
    """_accel.huff_frame writes standard zstd frames: libzstd must give back every byte (planes
    whose symbols are all below 128 are coded two symbols a look-up, others one: both here)."""
    import zstandard

    rng = np.random.default_rng(17)
    d = zstandard.ZstdDecompressor()
    out = np.empty(300_000, np.uint8)
    used = 0
    for n in (256, 257, 1000, 4097, 65791, 65792, 100_003, 131072):
        for dist in range(6):
            if dist == 0:
                a = rng.integers(0, 129, n)
            elif dist == 1:
                a = np.clip(rng.normal(120, 2, n), 0, 128)
            elif dist == 2:
                a = (rng.random(n) < 0.002) * 128                 # very skewed: length limiting
            elif dist == 3:
                a = rng.geometric(0.2, n).clip(0, 128)
            elif dist == 4:
                a = rng.integers(126, 128, n)                     # two symbols
            else:
                a = np.minimum(rng.zipf(1.3, n), 128)
            a = a.astype(np.uint8)
            k = cpu._accel.huff_frame(a, out)
            if k:
                used += 1
                assert k < n
                assert zstandard.frame_content_size(bytes(out[:k])) == n
                assert d.decompress(bytes(out[:k])) == a.tobytes(), (n, dist)
    assert used >= 40


@pytest.mark.skipif(cpu._accel is None or not hasattr(cpu._accel, "hist"), reason="C helper not built")
def test_byte_histograms_are_exact_with_and_without_vectors():
    """The coders' byte histograms (Huffman tables, entropy gates, ans estimates) count a plane's
    frequent values 64 bytes at a time where the CPU has AVX-512 BW: the same counts as the
    scalar loop whatever the plane, including one whose first 4 KB (the sample that picks the
    frequent values) look nothing like the rest; and the same Huffman frames."""
    rng = np.random.default_rng(23)
    modes = [0] + ([1] if cpu._accel.hist_simd(1) else [])
    out = {m: np.empty(300_000, np.uint8) for m in modes}
    try:
        for t in range(400):
            n = int(rng.choice([0, 1, 63, 64, 65, 16383, 16384, 16448, 131072])) if t % 2 else int(rng.integers(0, 140_000))
            kind = t % 6
            if kind == 0:
                a = rng.integers(0, 256, n)
            elif kind == 1:
                a = np.clip(rng.normal(120, 3, n), 0, 255)
            elif kind == 2:
                a = np.full(n, 7)
            elif kind == 3:                               # the sample lies about the rest
                a = np.clip(rng.normal(120, 2, n), 0, 255)
                a[n // 2:] = rng.integers(0, 256, n - n // 2)
            elif kind == 4:                               # frequent values and a long rare tail
                a = np.where(rng.random(n) < 0.9, rng.integers(118, 122, n), rng.integers(0, 128, n))
            else:
                a = np.minimum(rng.zipf(1.2, n), 255)
            a = a.astype(np.uint8)
            want = np.bincount(a, minlength=256).tolist()
            frames = {}
            for m in modes:
                cpu._accel.hist_simd(m)
                assert cpu._accel.hist(a) == want, (t, m)
                k = cpu._accel.huff_frame(a, out[m]) if n <= 131072 else 0
                frames[m] = bytes(out[m][:k])
            assert len(set(frames.values())) == 1, t
    finally:
        cpu._accel.hist_simd(1)


@pytest.mark.skipif(cpu._accel is None, reason="C helper not built")
def test_literal_frames_refuse_what_they_cannot_code():
    out = np.empty(100_000, np.uint8)          # room enough: each refusal is for the input's sake
    ok = np.random.default_rng(0).integers(0, 4, 3000, dtype=np.uint8)
    assert cpu._accel.huff_frame(ok, out) > 0
    assert cpu._accel.huff_frame(np.full(3000, 7, np.uint8), out) == 0              # one symbol
    assert cpu._accel.huff_frame(np.arange(3000, dtype=np.uint16).astype(np.uint8), out) == 0  # symbols > 128
    assert cpu._accel.huff_frame(np.zeros(100, np.uint8), out) == 0                 # too small
    assert cpu._accel.huff_frame(np.random.default_rng(0).integers(0, 2, 3000, dtype=np.uint8), np.empty(10, np.uint8)) == 0


@pytest.mark.skipif(cpu._accel is None, reason="C helper not built")
@pytest.mark.parametrize("dt", list(dtypes.BY_NAME.values()), ids=lambda d: d.name)
def test_accel_masked_equals_reference(dt):
    rng = np.random.default_rng(19)
    for n in (1, 7, 8, 9, 1003):
        x = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8).reshape(n, dt.itemsize)
        x[rng.random(n) < 0.6] = 0
        src = x.reshape(-1)
        ref_nnz, ref = transforms.split_masked(dt, src)
        nnz, fast = cpu.split_masked(dt, src)
        assert nnz == ref_nnz and [p.tobytes() for p in fast] == [p.tobytes() for p in ref]
        out = np.full_like(src, 0x77)
        cpu.merge_masked(dt, fast, out)
        assert out.tobytes() == src.tobytes()
        if nnz:
            with pytest.raises(mithril_gpu.CorruptFileError, match="bitmap"):
                cpu.merge_masked(dt, [np.zeros_like(fast[0])] + fast[1:], out)


def _unaligned(a: np.ndarray, fill=None) -> np.ndarray:
    """A copy of ``a`` (or an empty buffer of its size, filled with ``fill``) at an odd address."""
    buf = np.empty(a.size + 1, np.uint8)
    out = buf[1:]
    assert out.ctypes.data % 2 == 1
    out[...] = a if fill is None else fill
    return out


@pytest.mark.skipif(cpu._accel is None, reason="C helper not built")
@pytest.mark.parametrize("dt", [d for d in dtypes.BY_NAME.values() if d.itemsize > 1], ids=lambda d: d.name)
def test_accel_loops_take_buffers_at_any_address(dt):
    """A plane inside a file (a stored chunk, a hand-made delta file) need not be aligned to its
    element size: the C loops read and write through alignment-1 types. Every result at an odd
    address equals the numpy reference's."""
    rng = np.random.default_rng(23)
    n = 1027
    x = rng.integers(0, 256, n * dt.itemsize, dtype=np.uint8)
    b = x.copy()
    b[::3] = rng.integers(0, 256, b[::3].size, dtype=np.uint8)
    xu, bu = _unaligned(x), _unaligned(b)
    for tr in [t for t in ("fieldsplit", "bytegroup") if (dt.exp_bits or t != "fieldsplit")]:
        ref = [np.empty(n * w, np.uint8) for w in transforms.plane_widths(dt, tr)]
        transforms.split(dt, tr, x, ref)
        fast = [_unaligned(p, 0xAA) for p in ref]
        cpu.split_planes(dt, tr, xu, fast)
        assert [p.tobytes() for p in fast] == [p.tobytes() for p in ref], tr
        out = _unaligned(x, 0)
        cpu.merge_planes(dt, tr, [_unaligned(p) for p in ref], out)
        assert out.tobytes() == x.tobytes(), tr
    for op in delta.OPS:
        d = np.empty_like(x)
        delta.encode(op, dt, x, b, d)
        fast = _unaligned(x, 0)
        cpu.delta_apply(op, dt, xu, bu, fast, inverse=False)
        assert fast.tobytes() == d.tobytes(), op
        back = _unaligned(x, 0)
        cpu.delta_apply(op, dt, _unaligned(d), bu, back, inverse=True)
        assert back.tobytes() == x.tobytes(), op
    m = x.reshape(n, dt.itemsize).copy()
    m[rng.random(n) < 0.5] = 0
    m = _unaligned(m.reshape(-1))
    ref_nnz, ref = transforms.split_masked(dt, np.array(m))
    nnz, fast = cpu.split_masked(dt, m)
    assert nnz == ref_nnz and [p.tobytes() for p in fast] == [p.tobytes() for p in ref]
    out = _unaligned(m, 0x77)
    cpu.merge_masked(dt, [_unaligned(p) for p in ref], out)
    assert out.tobytes() == m.tobytes()
    ctx = ctxdelta.default_ctx(dt)
    if ctx is not None:
        s, w = ctx
        t = ctxdelta.encode("zigzag", dt, x, b, s, w)
        fast = _unaligned(x, 0)
        cpu.ctx_apply("zigzag", dt, xu, bu, fast, s, w, inverse=False)
        assert fast.tobytes() == t.tobytes()
        back = _unaligned(x, 0)
        cpu.ctx_apply("zigzag", dt, _unaligned(t), bu, back, s, w, inverse=True)
        assert back.tobytes() == x.tobytes()


@pytest.mark.skipif(cpu._accel is None, reason="C helper not built")
@pytest.mark.parametrize("dt", list(dtypes.BY_NAME.values()), ids=lambda d: d.name)
def test_masked_delta_in_one_pass_equals_reference(dt):
    """The fused writer's masked split of a delta (``_accel.masked_delta_split``) and the reader's
    inverse (``masked_merge_delta``), with the AVX-512 loops on and off, against the numpy
    reference (delta, then split_masked): every op, sizes around the vector widths, sparse to
    dense, buffers at odd addresses, and bitmaps that lie about the values they hold."""
    acc, isz = cpu._accel, dt.itemsize
    rng = np.random.default_rng(23)
    modes = [0] + ([1] if acc.msplit_simd(1) else [])
    try:
        for n in (0, 1, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 1003, 5000):
            for dens in (0.0, 0.07, 0.6, 1.0):
                for op in (None,) + delta.OPS:
                    x = rng.integers(0, 256, n * isz, dtype=np.uint8)
                    b = x.copy().reshape(n, isz)
                    moved = rng.random(n) < dens
                    b[moved] = rng.integers(0, 256, (int(moved.sum()), isz), dtype=np.uint8)
                    b = b.reshape(-1)
                    d = np.empty_like(x)
                    if op is None:
                        d[...] = x
                    else:
                        delta.encode(op, dt, x, b, d)
                    ref_nnz, ref = transforms.split_masked(dt, d)
                    code = -1 if op is None else delta.OPS.index(op)
                    fl = int(delta.is_float(dt))
                    ua = _unaligned if n else (lambda a, fill=None: a.copy())   # (an empty view has no odd address)
                    base = None if op is None else ua(b)
                    for mode in modes:
                        acc.msplit_simd(mode)
                        mask = np.full((n + 7) // 8, 0xAA, np.uint8)
                        planes = tuple(np.full(n, 0x55, np.uint8) for _ in range(isz))
                        nnz = acc.masked_delta_split(ua(x), base, isz, code, fl, mask, planes)
                        assert nnz == ref_nnz, (n, dens, op, mode)
                        assert [mask.tobytes()] + [p[:nnz].tobytes() for p in planes] == [p.tobytes() for p in ref]
                        out = ua(x, 0x77)
                        held = tuple(ua(p) if nnz else p for p in ref[1:])
                        assert acc.masked_merge_delta(ref[0], held, nnz, isz, code, fl, base, out) == nnz
                        assert out.tobytes() == x.tobytes(), (n, dens, op, mode)
                        if nnz:              # a bitmap with a bit too many, and values one short
                            lying = ref[0].copy()
                            lying[np.flatnonzero(lying != 0xFF)[0] if (lying != 0xFF).any() else 0] ^= 1
                            assert acc.masked_merge_delta(lying, held, nnz, isz, code, fl, base, out) != nnz
                            short = tuple(p[:nnz - 1] for p in held)
                            assert acc.masked_merge_delta(ref[0], short, nnz - 1, isz, code, fl, base, out) != nnz - 1
    finally:
        acc.msplit_simd(1)
