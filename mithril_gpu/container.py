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
from .errors import (CorruptFileError, MithrilError, NotMithrilFileError, TruncatedFileError, UnsupportedValueError,
                     UnsupportedVersionError, short)

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
MAX_SHAPE_PRODUCT = (1 << 63) - 1      # a shape's running product (torch's numel) must fit an int64
# A version field above this is damage, not a newer format (versions change rarely).
MAX_PLAUSIBLE_VERSION = 255
# Bytes of tensor a byte of plane can stand for: a masked plane's bitmap codes 8 elements of up to
# 8 bytes per byte. With non-overlapping chunks and codecs.ZSTD_MAX_EXPANSION this bounds what a
# file's tensors (other than "same" references) can make a reader allocate by its size.
MAX_TENSOR_PER_PLANE_BYTE = 64
MAX_CTX_BITS = 12                      # a context-sorted delta has at most 2^12 contexts
DEFAULT_CHUNK_ELEMS = 1 << 17          # 128 Ki elements: 128 KiB per one-byte plane

# Features a v1 reader understands. A file lists those it uses; a reader refuses unknown ones.
FEATURES = frozenset({"delta", "ndarray", "torch", "ctxdelta", "ans"})
DELTA_OPS = ("xor", "zigzag", "same")

_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_HEX = re.compile(r"[0-9a-f]*")


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
    row_digests: list[int] | None = None   # XXH64 of each row's original bytes (index key "row_xxh64"), if stored
    ctx: list[int] | None = None       # [s, w] of a context-sorted delta (feature "ctxdelta"), or None
    segs: list[int] | None = None      # with ctx: elements of each segment of the sorted stream
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

    @property
    def whole_only(self) -> bool:
        """True when rows cannot be decoded on their own (a context-sorted delta: its chunks hold
        segments of the sorted stream, not rows), so a partial read decodes the whole tensor."""
        return self.ctx is not None

    @property
    def units(self) -> int:
        """Coded units, each one chunk per plane: segments of a context-sorted delta, else rows."""
        return len(self.segs) if self.segs is not None else self.rows

    def unit_count(self, unit: int) -> int:
        return self.segs[unit] if self.segs is not None else self.row_count(unit)

    def plane_sizes(self, row: int) -> list[int]:
        """Uncompressed bytes of each plane of ``row`` (of segment ``row`` for a context-sorted delta)."""
        return transforms.plane_sizes(self.dtype, self.transform, self.unit_count(row),
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
        if self.ctx is not None:
            d["ctx"], d["segs"] = self.ctx, self.segs
        if self.row_digests is not None:
            d["row_xxh64"] = np.asarray(self.row_digests, dtype=">u8").tobytes().hex()
        return d


@dataclass
class Index:
    tensors: list[TensorEntry]
    tree: object
    metadata: dict | None = None
    source: dict | None = None
    base: dict | None = None
    writer: str = ""
    #: filled in by :func:`parse_index`: payload bytes, uncompressed plane bytes, and tensor bytes
    #: (without "same" references) of the file; each bounded by the file's size (FORMAT.md)
    payload_bytes: int = 0
    plane_bytes: int = 0
    tensor_bytes: int = 0

    def to_bytes(self) -> bytes:
        """The index as stored: one zstd frame holding the UTF-8 JSON."""
        raw = self.to_json()
        if len(raw) > MAX_INDEX_BYTES:       # (a reader would refuse it: never write what cannot be read)
            raise UnsupportedValueError(f"the checkpoint's index would be {len(raw):,} bytes, more than readers accept "
                                        f"({MAX_INDEX_BYTES:,}): a string or bytes value of hundreds of MB? store it "
                                        "as a tensor")
        return zstandard.ZstdCompressor(level=INDEX_ZSTD_LEVEL, write_content_size=True).compress(raw)

    def to_json(self) -> bytes:
        from . import tree as tree_mod

        features = (["delta"] if self.base is not None else []) \
            + (["ctxdelta"] if any(t.ctx is not None for t in self.tensors) else []) \
            + (["ans"] if any(codecs.ANS in t.chunks[2::3] for t in self.tensors) else []) \
            + sorted(tree_mod.features(self.tree))
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
        if not VERSION < version <= MAX_PLAUSIBLE_VERSION:
            raise CorruptFileError(f"the preamble's version field reads {version}, which no .mth file has: "
                                   "the file is damaged")
        raise UnsupportedVersionError(newer_version_message(version))
    if flags != 0 or reserved != 0:
        raise CorruptFileError(f"the preamble's flag bytes read {flags:#x}/{reserved:#x}, not 0 as in every "
                               f"version-{VERSION} file: the file is damaged")
    if file_size < MIN_FILE_SIZE:
        raise TruncatedFileError(f"file is {file_size} bytes, too short to hold a .mth trailer")
    off, length, digest, magic = TRAILER.unpack(tail)
    if magic != TRAILER_MAGIC:
        raise TruncatedFileError("the .mth trailer is missing: the file is truncated, was not completely "
                                 "written, or its end is damaged")
    if length > MAX_INDEX_BYTES:
        raise CorruptFileError(f"the trailer is damaged: it gives the index a length of {length} bytes, "
                               f"more than any index has (limit {MAX_INDEX_BYTES})")
    if off < PREAMBLE_SIZE or off + length != file_size - TRAILER_SIZE:
        raise CorruptFileError(f"the trailer is damaged (or the file was cut or padded): it places the index at "
                               f"{off}+{length}, which does not fit a {file_size}-byte file")
    return off, length, digest


def newer_version_message(version: int) -> str:
    return (f".mth format version {version} is newer than this reader's (version {VERSION}): upgrade "
            "mithril-gpu (if no newer writer made this file, it is damaged)")


def as_current_version(head: bytes) -> bytes:
    """``head`` with the preamble's version field set to this reader's: to tell a version field
    that damage changed (the rest is a sound version-1 file) from a real newer file."""
    return head[:8] + struct.pack("<H", VERSION) + head[10:]


def _fail(msg: str):
    raise CorruptFileError("corrupt index: " + msg)


def shape_problem(shape: tuple, itemsize: int) -> str | None:
    """Why a shape of non-negative ints cannot be a tensor's in a file (None: it can): the reader's
    rule, which writers of other formats' input check too, so they never write what no reader opens."""
    if len(shape) > MAX_RANK:
        return f"has more than {MAX_RANK} sizes"
    if any(s > 1 << 62 for s in shape):
        return "has a size above 2^62"
    running = 1
    for s in shape:                       # torch multiplies in order: (2^40, 2^40, 0) overflows it
        running *= s
        if running > MAX_SHAPE_PRODUCT:
            return "overflows a 64-bit element count"
    if math.prod(shape) * itemsize > MAX_NBYTES:
        return "is larger than any tensor a file can hold"
    return None


def _int(v, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if type(v) is not int or not lo <= v <= hi:
        _fail(f"{what} must be an integer in [{lo}, {hi}], got {v!r}"[:200])
    return v


def decode_index_json(raw: bytes, digest: int):
    """The index's JSON value, after its checksum and zstd frame are checked."""
    if xxhash.xxh64_intdigest(raw) != digest:
        raise CorruptFileError("index checksum mismatch: the file's index is damaged")
    try:
        size = zstandard.frame_content_size(raw)
        if not 0 <= size <= MAX_INDEX_BYTES:
            _fail(f"index frame declares {size} bytes (limit {MAX_INDEX_BYTES}, size required)")
        text = zstandard.ZstdDecompressor().decompress(raw, max_output_size=size)
    except zstandard.ZstdError as e:
        _fail(f"index is not a valid zstd frame ({e})")
    except MemoryError:
        raise MithrilError(f"not enough memory to decompress the file's index ({size} bytes)") from None
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _fail(f"not valid JSON ({e})"[:200])
    except MemoryError:
        raise MithrilError(f"not enough memory to parse the file's index ({size} bytes of JSON)") from None


def parse_index(raw: bytes, digest: int, data_end: int) -> Index:
    """Decode and validate the index. ``data_end`` is where chunk payloads must end."""
    d = decode_index_json(raw, digest)
    if not isinstance(d, dict):
        _fail("top level is not an object")
    if d.get("mithril") != VERSION:
        raise CorruptFileError(f"the index says version {short(repr(d.get('mithril')), 40)} but the preamble "
                               f"says {VERSION}: the file is damaged")
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
    entries, names, coded = [], set(), []
    delta_ok, ctx_ok = "delta" in feats, "ctxdelta" in feats
    for i, t in enumerate(tlist):
        e, has_chunks = _parse_tensor(t, i, data_end, delta_ok, ctx_ok)
        entries.append(e)
        if has_chunks:
            coded.append(e)
        if e.name in names:
            _fail(f"duplicate tensor name {short(e.name)!r}")
        names.add(e.name)
    sizes = _check_layout(entries, *_check_chunks(coded, data_end, "ans" in feats), data_end)
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
    return Index(entries, d.get("tree"), meta, source, base, str(d.get("writer", "")), *sizes)


def _check_layout(entries: list[TensorEntry], off: np.ndarray, csize: np.ndarray, planes: int,
                  data_end: int) -> tuple[int, int, int]:
    """Whole-file rules (vectorised): chunk payloads (at ``off``, of ``csize`` bytes, holding
    ``planes`` plane bytes in all) do not overlap, so the file's plane and tensor bytes are
    bounded by its size; each base tensor is named by at most one delta entry. Returns
    (payload, plane, tensor) byte totals."""
    refs = [e.delta["base"] for e in entries if e.delta is not None]
    if len(set(refs)) != len(refs):
        seen = set()
        dup = next(r for r in refs if r in seen or seen.add(r))
        _fail(f"two delta entries name the same base tensor {short(dup)!r}")
    if not off.size:
        return 0, 0, 0
    keep = csize > 0                            # empty chunks have no payload: they overlap nothing
    off, csize = off[keep], csize[keep]
    order = np.argsort(off, kind="stable")      # writers write in index order: usually sorted already
    off, csize = off[order], csize[order]
    end = off + csize
    clash = off[1:] < end[:-1]
    if clash.any():
        k = int(np.argmax(clash))
        a, b = _owners(entries, {int(off[k]), int(off[k + 1])})
        _fail(f"chunks overlap: the payloads at {int(off[k])}+{int(csize[k])} and {int(off[k + 1])}+"
              f"{int(csize[k + 1])} share bytes ({a}; {b}); every chunk must have its own bytes")
    payload = int(csize.sum())
    tensor = sum(e.nbytes for e in entries if (e.delta or {}).get("op") != "same")
    data = max(0, data_end - PREAMBLE_SIZE)
    if payload > data or planes > codecs.ZSTD_MAX_EXPANSION * payload \
            or tensor > MAX_TENSOR_PER_PLANE_BYTE * planes:
        _fail(f"sizes do not fit the file: {tensor} tensor bytes from {planes} plane bytes from {payload} "
              f"payload bytes in a {data}-byte data region")
    return payload, planes, tensor


def _owners(entries: list[TensorEntry], offsets: set) -> list[str]:
    """The first two chunks (tensor, row, plane) with a payload at one of ``offsets``, for messages."""
    found = []
    for e in entries:
        for i in range(0, len(e.chunks), 3):
            if e.chunks[i] in offsets and e.chunks[i + 1] > 0:
                row, plane = divmod(i // 3, len(e.widths))
                found.append(f"tensor {short(e.name)!r} row {row} plane {plane}")
                if len(found) == 2:
                    return found
    return found + ["?"] * (2 - len(found))


def _chunk_fields(e: TensorEntry) -> None:
    """Refuse chunk fields of ``e`` that are not integers in [0, 2^62) (the message names the first)."""
    try:
        arr = np.array(e.chunks)
    except (ValueError, OverflowError):          # ragged nesting
        arr = np.array([None])
    if arr.ndim != 1 or arr.dtype.kind not in "iub" or arr.dtype.itemsize > 8:
        bad = next((v for v in e.chunks if type(v) is not int or not 0 <= v < 1 << 62), None)
        _fail(f"tensor {short(e.name)!r}: chunk fields must be integers in [0, 2^62), found {bad!r}"[:300])


def _plane_sizes(e: TensorEntry) -> list[int]:
    """Uncompressed bytes of every chunk of ``e``, in index order (per unit, per plane)."""
    P = len(e.widths)
    if e.segs is not None:
        counts = e.segs
    else:
        counts = [e.chunk_elems] * (e.rows - 1) + [e.row_count(e.rows - 1)] if e.rows else []
    if e.transform == "masked":
        return [x for c, n in zip(counts, e.nnz) for x in ((c + 7) // 8, *([n] * (P - 1)))]
    if P == 1:
        w = e.widths[0]
        return [c * w for c in counts]
    return [c * w for c in counts for w in e.widths]


def _check_chunks(coded: list[TensorEntry], data_end: int, ans_ok: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Every chunk of every entry in ``coded`` inside [16, data_end), of a known codec, and able to
    hold its plane: one vectorised pass over all the chunks of the file (a 70 B-parameter model has
    about a million). Returns the chunks' offsets and sizes and the uncompressed plane bytes in
    all, for :func:`_check_layout`."""
    if not coded:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    try:
        arr = np.array([v for e in coded for v in e.chunks])
    except (ValueError, OverflowError):
        arr = np.array([None])
    if arr.ndim != 1 or arr.dtype.kind not in "iub" or arr.dtype.itemsize > 8:
        for e in coded:                          # name the first tensor at fault
            _chunk_fields(e)
        _fail("chunk fields must be integers in [0, 2^62)")
    arr = arr.astype(np.int64).reshape(-1, 3)
    off, csize, codec = arr[:, 0], arr[:, 1], arr[:, 2]
    usize = np.array([x for e in coded for x in _plane_sizes(e)], dtype=np.int64)
    checks = [
        (off >= PREAMBLE_SIZE, "chunk offset before the data region"),
        ((csize >= 0) & (csize <= data_end) & (off <= data_end - csize), "chunk beyond the data region"),
        ((codec == codecs.STORED) | (codec == codecs.ZSTD) | (codec == codecs.ANS), "unknown codec id"),
        ((codec != codecs.ANS) | ans_ok, "ans chunk in a file without the feature \"ans\""),
        ((codec != codecs.STORED) | (csize == usize), "stored chunk of the wrong size"),
        ((codec != codecs.ZSTD) | ((usize > 0) & (usize <= csize * codecs.ZSTD_MAX_EXPANSION)),
         "zstd chunk too small to hold its plane"),
        ((codec != codecs.ANS) | ((usize > 0) & (usize <= csize * codecs.ZSTD_MAX_EXPANSION) & (csize >= 9)),
         "ans chunk too small to hold its plane"),
    ]
    for ok, what in checks:
        if not ok.all():
            k = int(np.argmin(ok))
            starts = np.cumsum([0] + [len(e.chunks) // 3 for e in coded])
            t = int(np.searchsorted(starts, k, side="right")) - 1
            e = coded[t]
            row, plane = divmod(k - int(starts[t]), len(e.widths))
            _fail(f"tensor {short(e.name)!r} row {row} plane {plane}: {what} "
                  f"(offset {int(off[k])}, size {int(csize[k])}, codec {int(codec[k])}, plane {int(usize[k])} bytes)")
    return off, csize, int(usize.sum())


def _parse_tensor(t, i: int, data_end: int, delta_ok: bool, ctx_ok: bool = False):
    """One tensor entry, validated but for its chunks' values (see :func:`_check_chunks`), and
    whether it has chunks."""
    if not isinstance(t, dict):
        _fail(f"tensor #{i} is not an object")
    name = t.get("name")
    if not isinstance(name, str):
        _fail(f"tensor #{i} has no name")
    sname = short(name)
    try:
        dt = dtypes.from_name(t.get("dtype"))
    except (KeyError, TypeError):
        _fail(f"tensor {sname!r}: unknown dtype {short(repr(t.get('dtype')), 40)}")
    shape = t.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        _fail(f"tensor {sname!r}: shape must be a list of at most {MAX_RANK} sizes")
    shape = tuple(_int(s, f"tensor {sname!r} shape entry") for s in shape)
    why = shape_problem(shape, dt.itemsize)
    if why:
        _fail(f"tensor {sname!r}: shape {short(shape, 200)} {why}")
    transform = t.get("transform")
    if not isinstance(transform, str) or transform not in transforms.TRANSFORMS \
            or not transforms.valid_for(dt, transform):
        _fail(f"tensor {sname!r}: transform {short(repr(transform), 40)} is not defined for {dt.name}")
    width = max(transforms.plane_widths(dt, transform))
    chunk_elems = _int(t.get("chunk_elems"), f"tensor {sname!r} chunk_elems", 1, MAX_CHUNK_BYTES // width)
    xx = t.get("xxh64")
    if not isinstance(xx, str) or not _HEX16.match(xx):
        _fail(f"tensor {sname!r}: xxh64 must be 16 lowercase hex digits")
    delta = t.get("delta")
    if delta is not None:
        if not delta_ok or not isinstance(delta, dict) or delta.get("op") not in DELTA_OPS \
                or not isinstance(delta.get("base"), str):
            _fail(f"tensor {sname!r}: bad delta entry {short(repr(delta), 80)}")
    chunks = t.get("chunks")
    e = TensorEntry(name, dt, shape, transform, chunk_elems, int(xx, 16),
                    chunks if isinstance(chunks, list) else [], delta)
    if "ctx" in t or "segs" in t:
        _parse_ctx(e, t, sname, ctx_ok)
    nnz = t.get("nnz")
    if transform == "masked":
        if not isinstance(nnz, list) or len(nnz) != e.units:
            _fail(f"tensor {sname!r}: a masked tensor needs one nnz count per row (per segment with ctx)")
        e.nnz = [_int(v, f"tensor {sname!r} nnz", 0, e.unit_count(r)) for r, v in enumerate(nnz)]
    elif nnz is not None:
        _fail(f"tensor {sname!r}: nnz given for transform {short(transform, 40)!r}")
    rx = t.get("row_xxh64")
    if rx is not None:
        if not isinstance(rx, str) or len(rx) != 16 * e.rows or not _HEX.fullmatch(rx):
            _fail(f"tensor {sname!r}: row_xxh64 must be 16 lowercase hex digits for each of its {e.rows} rows")
        digs = np.frombuffer(bytes.fromhex(rx), dtype=">u8")
        if xxhash.xxh64_intdigest(digs.astype("<u8").tobytes()) != e.checksum:
            _fail(f"tensor {sname!r}: its row digests do not combine to its xxh64")
        e.row_digests = digs.tolist()
    expect = 0 if (delta or {}).get("op") == "same" else 3 * e.units * len(e.widths)
    if not isinstance(chunks, list) or len(chunks) != expect:
        _fail(f"tensor {sname!r}: expected {expect} chunk fields, found "
              f"{len(chunks) if isinstance(chunks, list) else type(chunks).__name__}")
    return e, expect > 0


def _parse_ctx(e: TensorEntry, t: dict, sname: str, ctx_ok: bool) -> None:
    """The ``ctx`` and ``segs`` keys of a context-sorted delta (FORMAT.md "Context-sorted deltas")."""
    ctx, segs = t.get("ctx"), t.get("segs")
    if not ctx_ok:
        _fail(f"tensor {sname!r}: ctx/segs in a file that does not list the ctxdelta feature")
    if e.delta is None or e.delta.get("op") not in ("xor", "zigzag"):
        _fail(f"tensor {sname!r}: ctx needs an xor or zigzag delta")
    bits = 8 * e.dtype.itemsize
    if not isinstance(ctx, list) or len(ctx) != 2:
        _fail(f"tensor {sname!r}: ctx must be [shift, width]")
    s = _int(ctx[0], f"tensor {sname!r} ctx shift", 0, bits - 1)
    w = _int(ctx[1], f"tensor {sname!r} ctx width", 1, min(MAX_CTX_BITS, bits - s))
    if not isinstance(segs, list) or len(segs) > e.count:
        _fail(f"tensor {sname!r}: segs must be a list of at most one size per element")
    try:
        arr = np.array(segs, dtype=np.int64) if segs else np.zeros(0, np.int64)
    except (ValueError, OverflowError, TypeError):
        arr = None
    if arr is None or arr.ndim != 1 or not all(type(v) is int for v in segs[:1]) \
            or (arr.size and (arr.min() < 1 or arr.max() > e.chunk_elems)) or int(arr.sum()) != e.count:
        _fail(f"tensor {sname!r}: segs must be sizes in [1, chunk_elems] that add up to the element count")
    if not all(type(v) is int for v in segs):
        _fail(f"tensor {sname!r}: segs must be integers")
    e.ctx, e.segs = [s, w], [int(v) for v in segs]
