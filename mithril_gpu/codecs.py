"""Chunk codecs: the one small interface between planes and bytes on disk.

Each chunk of a plane is coded on its own by one codec, named in the index by its id:

=====  ========  ==============================================================
id     name      payload
=====  ========  ==============================================================
0      stored    the chunk's bytes as they are
1      zstd      one standard zstd frame (RFC 8878) holding exactly the chunk
2      ans       a static rANS payload (``ans.py``; files with the feature "ans")
=====  ========  ==============================================================

The CPU path codes zstd with ``zstandard`` (libzstd), except float exponent planes, for which
``_accel.huff_frame`` writes frames of Huffman-coded literals only; the GPU path writes frames
with nvCOMP's zstd (RAW bitstream). Any zstd decoder reads all of them.

``ans`` is used only for the planes of delta entries (whose GPU loads decode on the CPU), and only
with the C helper (without it, files are written without ``ans`` and read with the numpy
reference, which is slow). ``_accel.ans_encode`` estimates a plane's rANS size and codes it when
the plane holds 64 bytes or more and 2 or more byte values, and the estimate is at least 3% under
a Huffman coding of the plane, or the plane is at most 4 bits a byte; the chunk is then the
smallest of that, zstd's frame and the stored plane. It pays where Huffman coding cannot spend
less than a bit on a byte: the bitmaps and value planes of sparse, small deltas.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import zstandard

from . import ans
from .errors import CorruptFileError

STORED = 0
ZSTD = 1
ANS = 2
CODEC_NAMES = {STORED: "stored", ZSTD: "zstd", ANS: "ans"}

# A chunk whose sampled order-0 entropy is above this many bits per byte is stored without
# trying zstd: it would not shrink (the sign+mantissa planes of trained floats are such).
STORE_ENTROPY_BITS = 7.8
_SAMPLE = 4096

# zstd's largest possible expansion: an RLE block of up to 128 KiB costs 4 bytes, a frame
# header at least 6. A frame of n bytes can never decode to more than this many times n
# (plus one block); readers use it to refuse lying sizes before allocating.
ZSTD_MAX_EXPANSION = 32768


def zstd_parameters(level: int | None) -> zstandard.ZstdCompressionParameters:
    """Compression parameters for a level. ``None`` is mithril's default.

    The default is zstd's "fast" strategy with a tiny hash table and long minimum matches:
    on float exponent planes LZ matches are short and spurious and displace Huffman-coded
    literals, so a frame of almost only literals reaches the order-0 bound, and fast
    (measured on MiniLM bf16: plane ratio 3.02 at ~860 MB/s, vs 2.75 for level 1 and 2.70
    for level 3; see ../shared/notes/measurements.md and benchmarks/).
    """
    if level is None:
        return zstandard.ZstdCompressionParameters(
            strategy=zstandard.STRATEGY_FAST, min_match=7, hash_log=6, search_log=1,
            window_log=17, write_content_size=True, write_checksum=False, threads=0,
        )
    if not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(f"level must be None (mithril's default) or a zstd level 1..22, got {level!r}")
    return zstandard.ZstdCompressionParameters.from_level(
        level, write_content_size=True, write_checksum=False, threads=0
    )


try:
    from ._accel import entropy as _entropy, huff_frame as _huff_frame
except ImportError:
    _entropy = _huff_frame = None
try:
    from ._accel import ans_decode_many as _ans_decode_many, ans_encode as _ans_encode, ans_simd as _accel_ans_simd
except ImportError:
    _ans_encode = _ans_decode_many = _accel_ans_simd = None

# Writers may code delta planes "ans" (readers always read it). MITHRIL_ANS=0 in the environment
# when mithril_gpu is imported (or codecs.ANS_ENABLED = False at any time) writes files without the
# feature, for readers older than it.
ANS_ENABLED = os.environ.get("MITHRIL_ANS", "1") != "0"


def ans_enabled() -> bool:
    """Whether this writer codes delta planes ``ans`` where that is smaller (needs the C helper)."""
    return ANS_ENABLED and _ans_encode is not None


def sampled_entropy_bits(chunk: np.ndarray) -> float:
    """Order-0 entropy (bits per byte) of an evenly strided sample of ``chunk``."""
    step = max(1, chunk.size // _SAMPLE)
    if _entropy is not None:
        return _entropy(chunk, step)
    counts = np.bincount(chunk[::step], minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


class ChunkCoder:
    """Codes chunks with per-thread zstd contexts (zstandard contexts are not thread safe)."""

    def __init__(self, level: int | None = None):
        self.level = level
        self._params = zstd_parameters(level)
        self._local = threading.local()

    def _huff_out(self, size: int) -> np.ndarray:
        b = getattr(self._local, "huff", None)
        if b is None or b.size < size:
            b = self._local.huff = np.empty(size, np.uint8)
        return b

    def _cctx(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(compression_params=self._params)
        return c

    def encode(self, chunk: np.ndarray, literals: bool = False, use_ans: bool = False) -> tuple[int, bytes | memoryview]:
        """Code one chunk (uint8). Returns ``(codec id, payload)``; never larger than stored.

        A stored payload is a view of ``chunk``: the caller keeps it unchanged until written.
        ``literals`` marks a float exponent plane: with the default level it is coded as a zstd
        frame of Huffman literals only (``_accel.huff_frame``), which is smaller and faster
        there than libzstd's own choice; libzstd codes it when that form does not apply.
        ``use_ans`` (a delta entry's plane) lets an ``ans`` payload replace the zstd frame or the
        stored bytes when the C helper's estimate calls for it and it is smaller.
        """
        if chunk.size == 0:
            return STORED, b""
        stored = (STORED, chunk.data)
        if chunk.size >= 256 and sampled_entropy_bits(chunk) > STORE_ENTROPY_BITS:
            return stored
        if literals and self.level is None and _huff_frame is not None:
            out = self._huff_out(2 * chunk.size + 256)
            n = _huff_frame(chunk, out)
            if n:
                return ZSTD, bytes(out[:n])
        payload = self._cctx().compress(chunk.data)
        best = stored if len(payload) >= chunk.size else (ZSTD, payload)
        if use_ans and ans_enabled():
            out = self._huff_out(chunk.size + 64)
            n = _ans_encode(chunk, out)
            if n and n < len(best[1]):
                return ANS, bytes(out[:n])
        return best


_dlocal = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_dlocal, "dctx", None)
    if d is None:
        d = _dlocal.dctx = zstandard.ZstdDecompressor()
    return d


def decode(codec: int, payload, usize: int, scratch: np.ndarray | None = None):
    """Decode one chunk; returns a buffer of exactly ``usize`` bytes. Raises CorruptFileError.

    zstd chunks are decoded into ``scratch`` (uint8, ``usize`` bytes) when given: warm memory,
    and nothing is ever allocated from what a frame header claims.
    """
    if codec == STORED:
        if len(payload) != usize:
            raise CorruptFileError(f"stored chunk holds {len(payload)} bytes, expected {usize}: the file is damaged")
        return payload
    if codec == ANS:
        return decode_ans(payload, usize, scratch)
    if codec != ZSTD:
        raise CorruptFileError(f"unknown codec id {codec}: the file is damaged")
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as e:
        raise CorruptFileError(f"a chunk's zstd frame header is bad ({e}): the file is damaged") from None
    if declared not in (-1, usize):
        raise CorruptFileError(f"a chunk's zstd frame declares {declared} bytes, expected {usize}: the file is damaged")
    out = scratch if scratch is not None else np.empty(usize, np.uint8)
    try:
        reader = _dctx().stream_reader(payload, read_across_frames=False)
        got = 0
        while got < usize:
            n = reader.readinto(out[got:])
            if n == 0:
                break
            got += n
        extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise CorruptFileError(f"a chunk's zstd frame does not decode ({e}): the file is damaged") from None
    if got != usize or extra:
        raise CorruptFileError(f"a chunk's zstd frame decodes to {'more' if extra else got} bytes, expected {usize}: "
                               "the file is damaged")
    return out


class SlowDecodeNote(UserWarning):
    """A one-line note that ans chunks are being decoded without the C helper (slowly)."""


_noted_slow = []


def decode_ans(payload, usize: int, scratch: np.ndarray | None = None) -> np.ndarray:
    """Decode an ``ans`` chunk of ``usize`` bytes (the C helper, or the numpy reference)."""
    if usize <= 0 or len(payload) * ZSTD_MAX_EXPANSION < usize:
        raise CorruptFileError(f"an ans chunk of {len(payload)} bytes cannot hold {usize}: the file is damaged")
    if _ans_decode_many is None:
        if not _noted_slow:
            _noted_slow.append(True)
            import warnings

            warnings.warn(SlowDecodeNote("mithril: decoding ans chunks without the C helper, about 100x slower "
                                         "(reinstall mithril-gpu with a C compiler to build it)"), stacklevel=2)
        return ans.decode(payload, usize)
    out = scratch if scratch is not None else np.empty(usize, np.uint8)
    if _ans_decode_many([(payload, out)]) != -1:
        raise CorruptFileError("an ans chunk does not decode: the file is damaged")
    return out
