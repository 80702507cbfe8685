"""The ans codec (id 2, feature "ans"): the numpy reference against the C helper, byte for byte;
damaged payloads refused; the writer's use of it on delta planes; files with it and without it."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import mithril_gpu
from conftest import FIXTURES
from mithril_gpu import ans, codecs, container, cpu
from mithril_gpu.errors import ChecksumMismatchError, CorruptFileError

needs_c = pytest.mark.skipif(codecs._ans_encode is None, reason="C helper not built")


def _planes(seed: int = 0):
    """Planes of the kinds deltas make, plus edge cases: (name, uint8 array)."""
    rng = np.random.default_rng(seed)
    out = [("uniform", rng.integers(0, 256, 5000, dtype=np.uint8)),
           ("plus-minus-1", rng.choice(np.array([1, 2, 3, 200], np.uint8), 9000, p=[0.5, 0.45, 0.04, 0.01])),
           ("sparse bitmap", np.packbits(rng.random(80000) < 0.03)),
           ("one symbol", np.full(777, 9, np.uint8)),
           ("geometric", (rng.geometric(0.2, 40000) % 256).astype(np.uint8)),
           ("two symbols", rng.integers(0, 2, 20000, dtype=np.uint8)),
           ("one element", np.array([200], np.uint8)),
           ("31 symbols", rng.integers(0, 31, 3000, dtype=np.uint8)),
           ("32 symbols", rng.integers(100, 132, 3000, dtype=np.uint8))]
    return out


def _c_encode(a, L, lanes, nib=False):
    out = np.empty(a.size * 6 + 2000, np.uint8)
    n = codecs._ans_encode(a, out, L, lanes, nib)
    return bytes(out[:n])


def _c_decode(payload, n):
    out = np.empty(n, np.uint8)
    r = codecs._ans_decode_many([(np.frombuffer(payload, np.uint8), out)])
    return r, out


def test_reference_round_trips_every_kind_of_plane():
    for name, a in _planes():
        for L, lanes in [(12, 1), (12, 3), (15, 32), (10, 7)]:
            if len(np.unique(a)) > 1 << L:
                continue
            p = ans.encode(a, L, lanes)
            assert np.array_equal(ans.decode(p, a.size), a), (name, L, lanes)


def test_nibble_mode_round_trips_and_c_equals_the_reference():
    for name, a in _planes(4):
        for L, lanes in [(12, 1), (12, 5), (15, 32), (4, 2)]:
            p = ans.encode(a, L, lanes, nibble_mode=True)
            assert p[0] == L + 16
            assert np.array_equal(ans.decode(p, a.size), a), (name, L, lanes)
            if codecs._ans_encode is not None:
                assert _c_encode(a, L, lanes, True) == p, (name, L, lanes)
                r, out = _c_decode(p, a.size)
                assert r == -1 and np.array_equal(out, a)


@needs_c
def test_avx2_encoder_writes_the_scalar_encoders_bytes():
    """The AVX2 encoder (lanes in multiples of 8) against the scalar one and the reference, and
    the capacity at which each refuses, byte for byte (a CPU without AVX2 runs the scalar twice)."""
    rng = np.random.default_rng(11)
    was = codecs._accel_ans_simd()
    try:
        for trial in range(120):
            n = int(rng.integers(1, 12000))
            a = [rng.integers(0, 256, n, dtype=np.uint8),
                 rng.choice(np.array([1, 2, 3, 200], np.uint8), n, p=[0.5, 0.45, 0.04, 0.01]),
                 (rng.geometric(0.05, n) % 256).astype(np.uint8)][trial % 3]
            L, lanes, nib = int(rng.integers(1, 16)), int(rng.choice([8, 16, 24, 32])), bool(trial % 5 == 0)
            a = a % (1 << min(L, 8)) if L < 8 and not nib else (a & ((1 << min(L, 4)) - 1) if nib and L < 4 else a)
            got = []
            for flag in (0, 1):
                codecs._accel_ans_simd(flag)
                got.append(_c_encode(a, L, lanes, nib))
            assert got[0] == got[1], (trial, n, L, lanes, nib)
            if trial < 30:
                assert got[0] == ans.encode(a, L, lanes, nibble_mode=nib)
        plane = rng.choice(np.array([1, 2, 3, 4], np.uint8), 70000, p=[0.49, 0.49, 0.01, 0.01])
        size = len(_c_encode(plane, 12, 32))
        refused = 0
        for cap in range(size - 20, size + 90):                   # refusal at a capacity: checked per round
            outs = []
            for flag in (0, 1):
                codecs._accel_ans_simd(flag)
                out = np.zeros(cap, np.uint8)
                outs.append((codecs._ans_encode(plane, out, 12, 32), out.tobytes()))
            assert outs[0][0] == outs[1][0], cap
            if outs[0][0]:
                assert outs[0][1][:outs[0][0]] == outs[1][1][:outs[1][0]], cap
            refused += outs[0][0] == 0
        assert 0 < refused < 110
    finally:
        codecs._accel_ans_simd(was)


def test_nibble_mode_refuses_symbols_of_16_and_more_and_unknown_modes():
    state = (1 << 16).to_bytes(4, "little")
    for head in (bytes([16 + 4, 1, 1, 3, 16, 8, 8]),      # nibble mode, a symbol 16
                 bytes([32 + 4, 1, 1, 3, 5, 8, 8])):      # mode 2
        with pytest.raises(CorruptFileError):
            ans.decode(head + state, 4)
        if codecs._ans_decode_many is not None:
            assert _c_decode(head + state, 4)[0] == 0
    ok = bytes([16 + 4, 1, 0, 3, 16]) + state             # nibble mode, one symbol: 3
    assert ans.decode(ok, 2).tolist() == [0x33, 0x33]
    if codecs._ans_decode_many is not None:
        assert _c_decode(ok, 2)[1].tolist() == [0x33, 0x33]


def test_normalize_sums_to_the_table_and_keeps_every_symbol():
    rng = np.random.default_rng(3)
    for _ in range(200):
        counts = np.zeros(256, np.int64)
        k = int(rng.integers(1, 257))
        counts[rng.choice(256, k, replace=False)] = rng.integers(1, 10 ** int(rng.integers(1, 7)), k)
        for L in (8, 12, 15):
            f = ans.normalize(counts, L)
            assert sum(f) == 1 << L
            assert all((c > 0) == (v > 0) for c, v in zip(counts, f))
    with pytest.raises(ValueError):
        ans.normalize(np.ones(256, np.int64), 7)


@needs_c
def test_c_encoder_and_decoder_equal_the_reference():
    rng = np.random.default_rng(1)
    cases = [(a, L, lanes) for _, a in _planes() for L, lanes in [(12, 1), (12, 2), (12, 32), (9, 5), (15, 17)]]
    cases += [((rng.geometric(0.4, int(rng.integers(1, 3000))) % 256).astype(np.uint8),
               int(rng.integers(8, 16)), int(rng.integers(1, 33))) for _ in range(150)]
    for a, L, lanes in cases:
        if len(np.unique(a)) > 1 << L:
            continue
        p = ans.encode(a, L, lanes)
        assert _c_encode(a, L, lanes) == p, (a.size, L, lanes)
        r, out = _c_decode(p, a.size)
        assert r == -1 and np.array_equal(out, a)


def _bad_payloads(p: bytes, n: int):
    """Damaged forms of payload p (for n symbols): each must be refused, or decode to something."""
    L, lanes, syms, freq, states, words, mode = ans.parse(p)
    yield "table log 0", bytes([0]) + p[1:]
    yield "table log 16", bytes([16]) + p[1:]
    yield "no lanes", p[:1] + bytes([0]) + p[2:]
    yield "33 lanes", p[:1] + bytes([33]) + p[2:]
    yield "truncated", p[:-1]
    yield "a word too many", p + b"\x00\x00"
    yield "a word short", p[:-2]
    yield "empty", b""
    yield "header only", p[:3]
    h = 3 + len(syms)
    yield "symbols out of order", p[:3] + bytes(reversed(p[3:h])) + p[h:]
    yield "a frequency of 0", p[:h] + b"\x00" + p[h + 1:]


def test_damaged_payloads_are_refused_by_both_decoders():
    rng = np.random.default_rng(5)
    a = rng.choice(np.array([1, 2, 3, 4], np.uint8), 6000, p=[0.48, 0.48, 0.02, 0.02])
    p = ans.encode(a, 12, 4)
    for why, bad in _bad_payloads(p, a.size):
        with pytest.raises(CorruptFileError):
            ans.decode(bad, a.size)
        if codecs._ans_decode_many is not None:
            r, _ = _c_decode(bad, a.size)
            assert r == 0, why
    # a wrong symbol count: the states or the words do not end where they must
    for n in (a.size - 1, a.size + 1):
        with pytest.raises(CorruptFileError):
            ans.decode(p, n)
        if codecs._ans_decode_many is not None:
            assert _c_decode(p, n)[0] == 0


@pytest.mark.parametrize("L,nib", [(11, False), (15, False), (10, True)])   # the C decoder's table and its search
def test_flipped_bits_never_pass_silently(L, nib):
    """Any one flipped bit: both decoders refuse the payload, or both give the same bytes (which
    the tensor's checksum then judges); never a crash or a read past the end."""
    rng = np.random.default_rng(8)
    a = rng.choice(np.array([0, 1, 2, 255], np.uint8), 700, p=[0.6, 0.2, 0.15, 0.05])
    p = bytearray(ans.encode(a, L, 3, nibble_mode=nib))
    for bit in range(len(p) * 8):
        q = bytearray(p)
        q[bit >> 3] ^= 1 << (bit & 7)
        try:
            ref = ans.decode(bytes(q), a.size)
        except CorruptFileError:
            ref = None
        if codecs._ans_decode_many is not None:
            r, out = _c_decode(bytes(q), a.size)
            assert (r == -1) == (ref is not None), bit
            if ref is not None:
                assert np.array_equal(out, ref)


def test_frequencies_must_be_minimal_leb128():
    state = (1 << 16).to_bytes(4, "little")
    good = bytes([1, 1, 0, 5, 2]) + state             # L=1, one lane, symbol 5 with frequency 2
    bad = bytes([1, 1, 0, 5, 0x82, 0x00]) + state     # the same frequency, not in minimal form
    assert ans.decode(good, 3).tolist() == [5, 5, 5]
    with pytest.raises(CorruptFileError):
        ans.decode(bad, 3)
    if codecs._ans_decode_many is not None:
        assert _c_decode(good, 3)[0] == -1 and _c_decode(good, 3)[1].tolist() == [5, 5, 5]
        assert _c_decode(bad, 3)[0] == 0


def test_bitmap_header_must_count_its_symbols():
    a = np.arange(40, dtype=np.uint8).repeat(10)
    p = bytearray(ans.encode(a, 12, 1))
    assert p[2] + 1 == 40
    p[3 + 5] |= 0x01                  # symbol 40: a 41st symbol in the bitmap
    with pytest.raises(CorruptFileError):
        ans.decode(bytes(p), a.size)
    if codecs._ans_decode_many is not None:
        assert _c_decode(bytes(p), a.size)[0] == 0


@needs_c
def test_writer_policy_uses_ans_only_where_it_pays():
    rng = np.random.default_rng(2)
    skewed = rng.choice(np.array([1, 2], np.uint8), 20000, p=[0.5, 0.5])
    out = np.empty(skewed.size + 64, np.uint8)
    n = codecs._ans_encode(skewed, out)
    assert 0 < n < 0.15 * skewed.size
    assert np.array_equal(ans.decode(bytes(out[:n]), skewed.size), skewed)
    assert ans.parse(bytes(out[:n]))[1] == ans.lanes_for(skewed.size) == 2
    bitmap = np.packbits(rng.random(4000) < 0.3)              # a small segment's bitmap: 100+ byte values
    n = codecs._ans_encode(bitmap, out)
    assert 0 < n and ans.parse(bytes(out[:n]))[6] == 1        # coded per nibble (a 16-entry table)
    assert np.array_equal(ans.decode(bytes(out[:n]), bitmap.size), bitmap)
    for no in (rng.integers(0, 256, 20000, dtype=np.uint8),     # incompressible
               (rng.geometric(0.03, 50000) % 256).astype(np.uint8),   # 6.5 bits a byte: Huffman codes it as well
               np.full(5000, 3, np.uint8),                        # one symbol: zstd's RLE block
               skewed[:63]):                                      # too short
        assert codecs._ans_encode(no, out) == 0
    coder = codecs.ChunkCoder()
    assert coder.encode(skewed, use_ans=True)[0] == codecs.ANS
    assert coder.encode(skewed)[0] == codecs.ZSTD
    codecs.ANS_ENABLED = False
    try:
        assert coder.encode(skewed, use_ans=True)[0] == codecs.ZSTD
    finally:
        codecs.ANS_ENABLED = True


@needs_c
@pytest.mark.parametrize("arena", ["roomy", "tight"])
def test_encode_many_gives_each_plane_what_one_at_a_time_gives(arena):
    """ans_encode_many codes one- and two-lane planes in step, several at a time: each plane's
    payload is what ans_encode (the writer's policy) gives for it alone, at its own offset
    (the sum of the planes before it), with that region's room; nothing written beyond it."""
    rng = np.random.default_rng(7)
    planes = []
    for k in range(60):
        size = int(rng.choice([70, 300, 1500, 6000, 9000, 14000, 17000, 30000, 40000, 70000]))
        kind = k % 5
        if kind == 0:
            a = rng.choice(np.array([1, 2, 3, 200], np.uint8), size, p=[0.5, 0.45, 0.04, 0.01])
        elif kind == 1:
            a = np.packbits(rng.random(8 * size) < rng.choice([0.01, 0.1, 0.3]))
        elif kind == 2:
            a = rng.integers(0, 256, size, dtype=np.uint8)               # left to zstd
        elif kind == 3:
            a = (rng.geometric(0.5, size) % 7).astype(np.uint8)
        else:
            a = rng.integers(0, 2, size, dtype=np.uint8) * 255
        planes.append(np.ascontiguousarray(a))
    total = sum(p.size for p in planes)
    size = total if arena == "roomy" else total * 2 // 3
    out = np.full(size + 64, 0xEE, np.uint8)
    rec = np.zeros((len(planes), 2), np.int64)
    cpu._accel.ans_encode_many(planes, out[:size], rec)
    assert (out[size:] == 0xEE).all()
    pos, coded = 0, 0
    for p, (off, n) in zip(planes, rec.tolist()):
        room = max(0, size - pos)
        one = np.empty(max(1, min(room, p.size)), np.uint8)
        m = codecs._ans_encode(p, one[:min(room, p.size)]) if room else 0
        assert n == m and (not n or off == pos)
        if n:
            coded += 1
            assert bytes(out[off:off + n]) == bytes(one[:m])
            assert np.array_equal(ans.decode(bytes(out[off:off + n]), p.size), p)
        pos += min(room, p.size)
    assert coded >= 20
    with pytest.raises(ValueError):                            # a record table that is not 8-byte aligned
        cpu._accel.ans_encode_many(planes[:2], out[:size], np.zeros(33, np.uint8)[1:])


def _sparse_pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": (torch.randn(300, 1000, generator=g) * 0.02).to(torch.bfloat16),
            "b": torch.randn(4099, generator=g), "i": torch.arange(5000, dtype=torch.int64)}
    nxt = {k: v.clone() for k, v in base.items()}
    w = nxt["w"].view(torch.int16)
    w += torch.where(torch.rand(w.shape, generator=g) < 0.1, 1, 0).to(torch.int16)
    nxt["b"][::13] += 1e-6
    nxt["i"] += (torch.rand(5000, generator=g) < 0.2).to(torch.int64)
    return base, nxt


def _codecs_of(path, base):
    with mithril_gpu.open(path, base=base) as f:
        return {c for e in f.index.tensors for c in e.chunks[2::3]}, json.loads(f.index.to_json())["features"]


@needs_c
@pytest.mark.parametrize("threads", [1, 3])
def test_delta_with_ans_round_trips_and_is_smaller(tmp_path, threads):
    base, nxt = _sparse_pair()
    bpath, dpath, opath = tmp_path / "b.mth", tmp_path / "d.mth", tmp_path / "o.mth"
    mithril_gpu.save(base, bpath)
    mithril_gpu.save(nxt, dpath, base=bpath, threads=threads)
    got, feats = _codecs_of(dpath, bpath)
    assert codecs.ANS in got and "ans" in feats
    back = mithril_gpu.load(dpath, base=bpath)
    assert all(torch.equal(back[k].view(torch.uint8), nxt[k].view(torch.uint8)) for k in nxt)
    codecs.ANS_ENABLED = False
    try:
        mithril_gpu.save(nxt, opath, base=bpath, threads=threads)
    finally:
        codecs.ANS_ENABLED = True
    got, feats = _codecs_of(opath, bpath)
    assert codecs.ANS not in got and "ans" not in feats
    assert os.path.getsize(dpath) < 0.95 * os.path.getsize(opath)


@needs_c
def test_fused_and_per_row_paths_write_the_same_ans_bytes(tmp_path, monkeypatch):
    base, nxt = _sparse_pair(1)
    bpath = tmp_path / "b.mth"
    mithril_gpu.save(base, bpath)
    mithril_gpu.save(nxt, tmp_path / "fused.mth", base=bpath, threads=2)
    monkeypatch.setattr(cpu, "FUSED", False)
    mithril_gpu.save(nxt, tmp_path / "rows.mth", base=bpath, threads=2)
    a, b = (open(tmp_path / n, "rb").read() for n in ("fused.mth", "rows.mth"))
    assert codecs.ANS in _codecs_of(tmp_path / "fused.mth", bpath)[0]
    assert a == b


@needs_c
def test_reader_without_the_c_helper_decodes_ans(tmp_path, monkeypatch):
    base, nxt = _sparse_pair(2)
    bpath, dpath = tmp_path / "b.mth", tmp_path / "d.mth"
    mithril_gpu.save(base, bpath)
    mithril_gpu.save(nxt, dpath, base=bpath)
    assert codecs.ANS in _codecs_of(dpath, bpath)[0]
    monkeypatch.setattr(codecs, "_ans_decode_many", None)     # the numpy reference decodes
    monkeypatch.setattr(codecs, "_noted_slow", [])
    with pytest.warns(codecs.SlowDecodeNote):
        back = mithril_gpu.load(dpath, base=bpath)
    assert all(torch.equal(back[k].view(torch.uint8), nxt[k].view(torch.uint8)) for k in nxt)


@needs_c
def test_checkpointer_deltas_from_memory_use_ans(tmp_path):
    """A Checkpointer's delta, coded against the previous tensors it holds in memory, uses ans
    too, and loads back bit-exact."""
    base, nxt = _sparse_pair(4)
    ck = mithril_gpu.Checkpointer(tmp_path / "ck", full_every=10, keep=None)
    ck.save(base, 0)
    ck.save(nxt, 1)
    got, feats = _codecs_of(ck.path(1), None)
    assert codecs.ANS in got and "ans" in feats
    back = mithril_gpu.load(ck.path(1))
    assert all(torch.equal(back[k].view(torch.uint8), nxt[k].view(torch.uint8)) for k in nxt)
    ck.close()


def test_mithril_ans_0_in_the_environment_writes_without_ans_and_still_reads_it(tmp_path):
    """MITHRIL_ANS=0 (read when mithril_gpu is imported): deltas written without the codec or the
    feature; files that have it are read as ever."""
    import subprocess
    import sys

    from conftest import ROOT

    code = f"""
import json, os, sys, torch
sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
import mithril_gpu
from mithril_gpu import codecs
from test_ans import _sparse_pair
assert not codecs.ANS_ENABLED
base, nxt = _sparse_pair(5)
mithril_gpu.save(base, {str(tmp_path / "b.mth")!r})
mithril_gpu.save(nxt, {str(tmp_path / "d.mth")!r}, base={str(tmp_path / "b.mth")!r})
with mithril_gpu.open({str(tmp_path / "d.mth")!r}) as f:
    assert "ans" not in json.loads(f.index.to_json())["features"]
    assert codecs.ANS not in {{c for e in f.index.tensors for c in e.chunks[2::3]}}
g = mithril_gpu.load({os.path.join(FIXTURES, "golden_v1_ans.mth")!r}, base={os.path.join(FIXTURES, "golden_ans_base.mth")!r})
print("ok", sorted(g))
"""
    env = dict(os.environ, MITHRIL_ANS="0")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "ok ['n', 'v', 'w']" in p.stdout, p.stderr[-2000:]


def _first_ans_chunk(path, base):
    with mithril_gpu.open(path, base=base) as f:
        for e in f.index.tensors:
            for o, c, k in zip(e.chunks[0::3], e.chunks[1::3], e.chunks[2::3]):
                if k == codecs.ANS:
                    return o, c
    raise AssertionError("no ans chunk")


@needs_c
@pytest.mark.parametrize("fused", [True, False])
def test_damaged_ans_chunk_in_a_file_gives_a_typed_error(tmp_path, monkeypatch, fused):
    monkeypatch.setattr(cpu, "FUSED", fused)
    base, nxt = _sparse_pair(3)
    bpath, dpath = tmp_path / "b.mth", tmp_path / "d.mth"
    mithril_gpu.save(base, bpath)
    mithril_gpu.save(nxt, dpath, base=bpath)
    o, c = _first_ans_chunk(dpath, bpath)
    raw = bytearray(open(dpath, "rb").read())
    for pos in (o + 1, o + c // 2, o + c - 1):        # lanes, the middle of the words, the last word
        bad = bytearray(raw)
        bad[pos] ^= 0x41
        p = tmp_path / "bad.mth"
        p.write_bytes(bytes(bad))
        with pytest.raises((CorruptFileError, ChecksumMismatchError)):
            mithril_gpu.load(p, base=bpath)


def test_index_rules_for_ans_chunks():
    """Codec 2 only in files with the feature; an ans chunk of at least 9 bytes, holding at most
    32768 times its size."""
    e = container.TensorEntry("t", container.dtypes.from_name("U8"), (100000,), "raw", 131072, 0,
                              [16, 10, codecs.ANS])
    container._check_chunks([e], 1000, ans_ok=True)
    with pytest.raises(CorruptFileError, match="ans"):
        container._check_chunks([e], 1000, ans_ok=False)
    e.chunks = [16, 3, codecs.ANS]
    with pytest.raises(CorruptFileError, match="ans chunk too small"):
        container._check_chunks([e], 1000, ans_ok=True)
    e.shape = (10 ** 7,)
    e.chunk_elems = 10 ** 7
    e.chunks = [16, 100, codecs.ANS]
    with pytest.raises(CorruptFileError, match="ans chunk too small"):
        container._check_chunks([e], 1000, ans_ok=True)


def test_codec_decode_refuses_impossible_sizes():
    with pytest.raises(CorruptFileError):
        codecs.decode(codecs.ANS, b"\x0c\x01\x00\x05\x80\x20" + b"\x00\x00\x01\x00", 10 ** 6)
    with pytest.raises(CorruptFileError):
        codecs.decode(codecs.ANS, b"\x0c\x01\x00\x05\x80\x20" + b"\x00\x00\x01\x00", 0)
    # one symbol, one lane: 5 copies of symbol 5 (the state never moves)
    assert codecs.decode(codecs.ANS, b"\x0c\x01\x00\x05\x80\x20" + b"\x00\x00\x01\x00", 5).tolist() == [5] * 5


def test_golden_ans_file_decodes_to_known_bytes():
    with open(os.path.join(FIXTURES, "golden_v1.json")) as fh:
        want = json.load(fh)["golden_v1_ans.mth"]
    base = os.path.join(FIXTURES, "golden_ans_base.mth")
    with mithril_gpu.open(os.path.join(FIXTURES, "golden_v1_ans.mth"), base=base) as f:
        assert "ans" in json.loads(f.index.to_json())["features"]
        heads = [ans.parse(f._buf[o:o + c])[:3] + ans.parse(f._buf[o:o + c])[6:] for e in f.index.tensors
                 for o, c, k in zip(e.chunks[0::3], e.chunks[1::3], e.chunks[2::3]) if k == codecs.ANS]
        assert {1, 2} <= {h[1] for h in heads} and {0, 1} <= {h[3] for h in heads}
        assert any(len(h[2]) >= 32 for h in heads) and any(len(h[2]) < 32 for h in heads)
        assert any(e.ctx is not None and codecs.ANS in e.chunks[2::3] for e in f.index.tensors)
        for key, digest in want.items():
            assert hashlib.sha256(f.get_bytes(key).tobytes()).hexdigest() == digest, key


def test_golden_ans_file_is_what_the_writer_writes_today(tmp_path):
    """Same input, same layout (the fixture's own recipe): each tensor's coding, segments and the
    codec of every chunk, so the writer's ans choices have not drifted."""
    if codecs._ans_encode is None:
        pytest.skip("C helper not built")
    import sys

    sys.path.insert(0, FIXTURES)
    from make_fixtures import ans_states

    from mithril_gpu import deltaplan

    base, nxt = ans_states()
    bpath = os.path.join(FIXTURES, "golden_ans_base.mth")
    saved = deltaplan.choose_ctx
    deltaplan.choose_ctx = lambda item, x, b: (("zigzag", "masked", (7, 8)) if item.name == "w"
                                               else (*deltaplan.choose(item, x, b), None))
    try:
        mithril_gpu.save(nxt, tmp_path / "d.mth", threads=1, base=bpath)
    finally:
        deltaplan.choose_ctx = saved

    def layout(path):
        with mithril_gpu.open(path, base=bpath) as f:
            return [(e.name, e.transform, e.ctx, e.segs, e.chunks[2::3]) for e in f.index.tensors]
    assert layout(tmp_path / "d.mth") == layout(os.path.join(FIXTURES, "golden_v1_ans.mth"))
