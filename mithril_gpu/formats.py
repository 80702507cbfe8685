"""Other checkpoint formats in and out: safetensors (byte-exact) and torch .pt (weights_only).

safetensors is parsed here directly (8-byte little-endian header length, JSON header, data), so
that a file compressed and decompressed comes back byte-identical: the original header bytes
are kept in the .mth index and the tensors are written back at their original offsets.
"""
from __future__ import annotations

import base64
import json
import mmap
import os
import struct

import numpy as np

from . import dtypes
from .errors import MithrilError

SAFETENSORS_MAX_HEADER = 100 << 20


class InputFormatError(MithrilError):
    """An input checkpoint (safetensors or torch) cannot be read."""


def sniff(path) -> str:
    """'safetensors', 'torch', 'mth' or 'unknown', from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"\x89MTH"):
        return "mth"
    if head[:2] == b"PK" or head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


class SafetensorsFile:
    """A .safetensors file mapped read-only; tensors are zero-copy uint8 views of the map."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise InputFormatError(f"{self.path}: too short to be a safetensors file")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", self._mm[:8])
        if n > SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise InputFormatError(f"{self.path}: safetensors header length {n} does not fit the file")
        self.header_bytes = bytes(self._mm[:8 + n])
        try:
            header = json.loads(self.header_bytes[8:].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise InputFormatError(f"{self.path}: safetensors header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise InputFormatError(f"{self.path}: safetensors header is not an object")
        self.metadata = header.pop("__metadata__", None)
        data_start, data_len = 8 + n, size - 8 - n
        self.tensors = []       # (name, DType, shape, begin, end) in file order
        for name, info in header.items():
            try:
                dt = dtypes.from_name(info["dtype"])
                shape = tuple(int(x) for x in info["shape"])
                b, e = (int(x) for x in info["data_offsets"])
            except KeyError:
                raise InputFormatError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                       f"{info.get('dtype')!r} or a malformed entry") from None
            except (TypeError, ValueError):
                raise InputFormatError(f"{self.path}: tensor {name!r} has a malformed entry") from None
            if not 0 <= b <= e <= data_len or e - b != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise InputFormatError(f"{self.path}: tensor {name!r} offsets do not match its shape")
            self.tensors.append((name, dt, shape, b, e))
        self.tensors.sort(key=lambda t: (t[3], t[4]))
        pos = 0
        for name, _, _, b, e in self.tensors:
            if b != pos:
                raise InputFormatError(f"{self.path}: tensor data is not contiguous at {name!r} "
                                       "(safetensors requires it)")
            pos = e
        if pos != data_len:
            raise InputFormatError(f"{self.path}: {data_len - pos} bytes after the last tensor")
        self._data_start = data_start

    def data(self, begin: int, end: int) -> np.ndarray:
        return np.frombuffer(self._mm, np.uint8, end - begin, self._data_start + begin)

    def release(self, begin: int, end: int) -> None:
        """Drop the mapped pages of a tensor already compressed from this process's memory
        (they stay in the page cache), so compressing a file never holds the whole input."""
        page = mmap.PAGESIZE
        lo = (self._data_start + begin + page - 1) // page * page
        hi = (self._data_start + end) // page * page
        if hi > lo and hasattr(self._mm, "madvise"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def source_record(self) -> dict:
        return {"format": "safetensors", "header": base64.b64encode(self.header_bytes).decode("ascii")}

    def close(self):
        try:
            self._mm.close()
        except BufferError:
            pass


def safetensors_header(entries, metadata: dict | None) -> bytes:
    """A fresh safetensors header (with its length prefix) for entries in the given order."""
    header, pos = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for e in entries:
        header[e.name] = {"dtype": e.dtype.name, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def original_safetensors_layout(source: dict | None, entries) -> tuple[bytes, list] | None:
    """If the .mth was made from a safetensors file, its header bytes and tensors in file order."""
    if not source or source.get("format") != "safetensors" or not isinstance(source.get("header"), str):
        return None
    try:
        raw = base64.b64decode(source["header"], validate=True)
        header = json.loads(raw[8:].decode("utf-8"))
        header.pop("__metadata__", None)
        by_name = {e.name: e for e in entries}
        order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        ordered = [by_name[name] for name, _ in order]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if len(ordered) != len(entries):
        return None
    return raw, ordered


def load_torch(path):
    """Read a torch checkpoint without unpickling arbitrary objects (weights_only=True)."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here; say what happened in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = ("; it holds objects other than tensors and plain values (a pickled model?): if you trust it, "
                    "load it yourself and compress its state_dict() with mithril_gpu.save")
        raise InputFormatError(f"{path}: cannot be read as a torch checkpoint with weights_only=True "
                               f"({first[:200]}){hint}") from None
