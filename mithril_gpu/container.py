"""The .mth container (FORMAT.md "File layout" and "Index"): framing, index model, validation.

Everything a reader learns from a file passes through :func:`parse_index`, which checks every
field against the file's real size before anything is allocated or decoded, and raises a
:class:`~mithril_gpu.errors.FormatError` subclass with a one-line reason otherwise.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash
import zstandard

from . import codecs, dtypes, transforms
from .errors import (CorruptFileError, NotMithrilFileError, TruncatedFileError,
                     UnsupportedVersionError)

MAGIC = b"\x89MTH\r\n\x1a\n"          # 8 bytes, PNG-style: catches text-mode and 7-bit damage
TRAILER_MAGIC = b"MTHINDEX"
VERSION = 1
PREAMBLE = struct.Struct("<8sHHI")     # magic, version, flags, reserved
TRAILER = struct.Struct("<QQQ8s")      # index offset, index length, XXH64(index), magic
PREAMBLE_SIZE = PREAMBLE.size          # 16
TRAILER_SIZE = TRAILER.size            # 32
MIN_FILE_SIZE = PREAMBLE_SIZE + TRAILER_SIZE

MAX_INDEX_BYTES = 256 << 20            # a reader refuses larger indexes (~10 M chunks), stored or decoded
INDEX_ZSTD_LEVEL = 9
MAX_CHUNK_BYTES = 64 << 20             # largest uncompressed chunk of one plane
MAX_RANK = 64
MAX_NBYTES = 1 << 50                   # 1 PiB per tensor
DEFAULT_CHUNK_ELEMS = 1 << 17          # 128 Ki elements: 128 KiB per one-byte plane

# Features a v1 reader understands. A file lists those it uses; a reader refuses unknown ones.
FEATURES = frozenset({"delta"})
DELTA_OPS = ("xor", "zigzag", "same")

_HEX16 = re.compile(r"[0-9a-f]{16}\Z")


def pack_preamble() -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION, 0, 0)


def pack_trailer(index_offset: int, index: bytes) -> bytes:
    return TRAILER.pack(index_offset, len(index), xxhash.xxh64_intdigest(index), TRAILER_MAGIC)


@dataclass
class TensorEntry:
    """One tensor of the index, with its layout derived from dtype, shape and chunk size."""

    name: str
    dtype: dtypes.DType
    shape: tuple[int, ...]
    transform: str
    chunk_elems: int
    checksum: int
    chunks: list[int]                  # flat: (offset, csize, codec) per (row, plane)
    delta: dict | None = None          # {"op": "xor"|"zigzag"|"same", "base": name} or None
    nnz: list[int] | None = None       # nonzero elements per row, for the masked transform
    widths: list[int] = field(init=False)

    def __post_init__(self):
        self.widths = transforms.plane_widths(self.dtype, self.transform)

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    @property
    def rows(self) -> int:
        return -(-self.count // self.chunk_elems)

    def row_count(self, row: int) -> int:
        return min(self.chunk_elems, self.count - row * self.chunk_elems)

    def plane_sizes(self, row: int) -> list[int]:
        """Uncompressed bytes of each plane of ``row``."""
        return transforms.plane_sizes(self.dtype, self.transform, self.row_count(row),
                                      self.nnz[row] if self.nnz is not None else None)

    def chunk(self, row: int, plane: int) -> tuple[int, int, int]:
        i = 3 * (row * len(self.widths) + plane)
        return self.chunks[i], self.chunks[i + 1], self.chunks[i + 2]

    @property
    def stored_bytes(self) -> int:
        return sum(self.chunks[1::3])

    def to_json(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape),
             "transform": self.transform, "chunk_elems": self.chunk_elems,
             "xxh64": f"{self.checksum:016x}", "chunks": self.chunks}
        if self.delta is not None:
            d["delta"] = self.delta
        if self.nnz is not None:
            d["nnz"] = self.nnz
        return d


@dataclass
class Index:
    tensors: list[TensorEntry]
    tree: object
    metadata: dict | None = None
    source: dict | None = None
    base: dict | None = None
    writer: str = ""

    def to_bytes(self) -> bytes:
        """The index as stored: one zstd frame holding the UTF-8 JSON."""
        return zstandard.ZstdCompressor(level=INDEX_ZSTD_LEVEL, write_content_size=True).compress(self.to_json())

    def to_json(self) -> bytes:
        features = ["delta"] if self.base is not None else []
        d = {"mithril": VERSION, "features": features, "writer": self.writer,
             "tensors": [t.to_json() for t in self.tensors], "tree": self.tree,
             "metadata": self.metadata, "source": self.source, "base": self.base}
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# ---------------------------------------------------------------- reading

def read_frame(head: bytes, tail: bytes, file_size: int) -> tuple[int, int, int]:
    """Check preamble and trailer; return (index offset, index length, index xxh64)."""
    if file_size < PREAMBLE_SIZE or head[:8] != MAGIC:
        if head[:1] == b"{" or (len(head) >= 8 and head[8:9] == b"{"):
            hint = " (it looks like a .safetensors file: compress it with `mithril compress`)"
        elif head[:2] == b"PK":
            hint = " (it looks like a torch.save zip: compress it with `mithril compress`)"
        else:
            hint = ""
        if file_size < PREAMBLE_SIZE and MAGIC.startswith(head) and head:
            raise TruncatedFileError(f"file is {file_size} bytes, too short to be a .mth file")
        raise NotMithrilFileError("not a .mth file: the magic bytes are missing" + hint)
    _, version, flags, reserved = PREAMBLE.unpack(head[:PREAMBLE_SIZE])
    if version != VERSION:
        raise UnsupportedVersionError(
            f".mth format version {version} is not supported by this reader (it reads version "
            f"{VERSION}); upgrade mithril-gpu")
    if flags != 0 or reserved != 0:
        raise UnsupportedVersionError(f"unknown preamble flags {flags:#x}/{reserved:#x}; upgrade mithril-gpu")
    if file_size < MIN_FILE_SIZE:
        raise TruncatedFileError(f"file is {file_size} bytes, too short to hold a .mth trailer")
    off, length, digest, magic = TRAILER.unpack(tail)
    if magic != TRAILER_MAGIC:
        raise TruncatedFileError(
            "the .mth trailer is missing: the file is truncated or was not completely written")
    if length > MAX_INDEX_BYTES:
        raise CorruptFileError(f"index length {length} exceeds the limit of {MAX_INDEX_BYTES} bytes")
    if off < PREAMBLE_SIZE or off + length != file_size - TRAILER_SIZE:
        raise CorruptFileError(
            f"trailer places the index at {off}+{length}, which does not fit a {file_size}-byte file")
    return off, length, digest


def _fail(msg: str):
    raise CorruptFileError("corrupt index: " + msg)


def _int(v, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(v) is not int or not lo <= v <= hi:
        _fail(f"{what} must be an integer in [{lo}, {hi}], got {v!r}"[:200])
    return v


def parse_index(raw: bytes, digest: int, data_end: int) -> Index:
    """Decode and validate the index. ``data_end`` is where chunk payloads must end."""
    if xxhash.xxh64_intdigest(raw) != digest:
        raise CorruptFileError("index checksum mismatch: the file's index is damaged")
    try:
        size = zstandard.frame_content_size(raw)
        if not 0 <= size <= MAX_INDEX_BYTES:
            _fail(f"index frame declares {size} bytes (limit {MAX_INDEX_BYTES}, size required)")
        text = zstandard.ZstdDecompressor().decompress(raw, max_output_size=size)
    except zstandard.ZstdError as e:
        _fail(f"index is not a valid zstd frame ({e})")
    try:
        d = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _fail(f"not valid JSON ({e})"[:200])
    if not isinstance(d, dict):
        _fail("top level is not an object")
    if d.get("mithril") != VERSION:
        raise UnsupportedVersionError(f"index version {d.get('mithril')!r} is not supported")
    feats = d.get("features", [])
    if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
        _fail("features must be a list of strings")
    unknown = set(feats) - FEATURES
    if unknown:
        raise UnsupportedVersionError(
            f"file uses features {sorted(unknown)} that this reader does not know; upgrade mithril-gpu")
    tlist = d.get("tensors")
    if not isinstance(tlist, list):
        _fail("tensors must be a list")
    entries, names = [], set()
    for i, t in enumerate(tlist):
        entries.append(_parse_tensor(t, i, data_end, "delta" in feats))
        if entries[-1].name in names:
            _fail(f"duplicate tensor name {entries[-1].name!r}")
        names.add(entries[-1].name)
    meta = d.get("metadata")
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        _fail("metadata must map strings to strings")
    source = d.get("source")
    if source is not None and not isinstance(source, dict):
        _fail("source must be an object")
    base = d.get("base")
    if base is not None:
        if "delta" not in feats or not isinstance(base, dict) or not isinstance(base.get("xxh64"), str) \
                or not _HEX16.match(base["xxh64"]):
            _fail("base must be an object with an xxh64 of 16 hex digits, in a file with the delta feature")
    return Index(entries, d.get("tree"), meta, source, base, str(d.get("writer", "")))


def _check_chunks(e: TensorEntry, data_end: int) -> None:
    """Every chunk of ``e`` inside [16, data_end), of a known codec, and able to hold its plane
    (vectorised: a file of a 70 B-parameter model has about a million chunks)."""
    try:
        arr = np.array(e.chunks)
    except (ValueError, OverflowError):          # ragged nesting
        arr = np.array([None])
    if arr.ndim != 1 or arr.dtype.kind not in "iub" or arr.dtype.itemsize > 8:
        bad = next((v for v in e.chunks if type(v) is not int or not 0 <= v < 1 << 62), None)
        _fail(f"tensor {e.name!r}: chunk fields must be integers in [0, 2^62), found {bad!r}"[:200])
    arr = arr.astype(np.int64)
    P = len(e.widths)
    arr = arr.reshape(e.rows, P, 3)
    off, csize, codec = arr[:, :, 0], arr[:, :, 1], arr[:, :, 2]
    counts = np.full(e.rows, e.chunk_elems, dtype=np.int64)
    counts[-1] = e.row_count(e.rows - 1)
    if e.transform == "masked":
        usize = np.empty((e.rows, P), dtype=np.int64)
        usize[:, 0] = (counts + 7) // 8
        usize[:, 1:] = np.asarray(e.nnz, dtype=np.int64)[:, None]
    else:
        usize = counts[:, None] * np.asarray(e.widths, dtype=np.int64)[None, :]
    checks = [
        (off >= PREAMBLE_SIZE, "chunk offset before the data region"),
        ((csize >= 0) & (csize <= data_end) & (off <= data_end - csize), "chunk beyond the data region"),
        ((codec == codecs.STORED) | (codec == codecs.ZSTD), "unknown codec id"),
        ((codec != codecs.STORED) | (csize == usize), "stored chunk of the wrong size"),
        ((codec != codecs.ZSTD) | ((usize > 0) & (usize <= csize * codecs.ZSTD_MAX_EXPANSION)),
         "zstd chunk too small to hold its plane"),
    ]
    for ok, what in checks:
        if not ok.all():
            row, plane = (int(v) for v in np.argwhere(~ok)[0])
            _fail(f"tensor {e.name!r} row {row} plane {plane}: {what} "
                  f"(offset {int(off[row, plane])}, size {int(csize[row, plane])}, codec {int(codec[row, plane])}, "
                  f"plane {int(usize[row, plane])} bytes)")


def _parse_tensor(t, i: int, data_end: int, delta_ok: bool) -> TensorEntry:
    if not isinstance(t, dict):
        _fail(f"tensor #{i} is not an object")
    name = t.get("name")
    if not isinstance(name, str):
        _fail(f"tensor #{i} has no name")
    try:
        dt = dtypes.from_name(t.get("dtype"))
    except KeyError:
        _fail(f"tensor {name!r}: unknown dtype {t.get('dtype')!r}"[:200])
    shape = t.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        _fail(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} sizes")
    shape = tuple(_int(s, f"tensor {name!r} shape entry") for s in shape)
    if math.prod(shape) * dt.itemsize > MAX_NBYTES:
        _fail(f"tensor {name!r}: shape {shape} is larger than any tensor a file can hold")
    transform = t.get("transform")
    if transform not in transforms.TRANSFORMS or not transforms.valid_for(dt, transform):
        _fail(f"tensor {name!r}: transform {transform!r} is not defined for {dt.name}"[:200])
    width = max(transforms.plane_widths(dt, transform))
    chunk_elems = _int(t.get("chunk_elems"), f"tensor {name!r} chunk_elems", 1, MAX_CHUNK_BYTES // width)
    xx = t.get("xxh64")
    if not isinstance(xx, str) or not _HEX16.match(xx):
        _fail(f"tensor {name!r}: xxh64 must be 16 lowercase hex digits")
    delta = t.get("delta")
    if delta is not None:
        if not delta_ok or not isinstance(delta, dict) or delta.get("op") not in DELTA_OPS \
                or not isinstance(delta.get("base"), str):
            _fail(f"tensor {name!r}: bad delta entry {delta!r}"[:200])
    chunks = t.get("chunks")
    e = TensorEntry(name, dt, shape, transform, chunk_elems, int(xx, 16),
                    chunks if isinstance(chunks, list) else [], delta)
    nnz = t.get("nnz")
    if transform == "masked":
        if not isinstance(nnz, list) or len(nnz) != e.rows:
            _fail(f"tensor {name!r}: a masked tensor needs one nnz count per row")
        e.nnz = [_int(v, f"tensor {name!r} nnz", 0, e.row_count(r)) for r, v in enumerate(nnz)]
    elif nnz is not None:
        _fail(f"tensor {name!r}: nnz given for transform {transform!r}")
    expect = 0 if (delta or {}).get("op") == "same" else 3 * e.rows * len(e.widths)
    if not isinstance(chunks, list) or len(chunks) != expect:
        _fail(f"tensor {name!r}: expected {expect} chunk fields, found "
              f"{len(chunks) if isinstance(chunks, list) else type(chunks).__name__}")
    if expect:
        _check_chunks(e, data_end)
    return e
