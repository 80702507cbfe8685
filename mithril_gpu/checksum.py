"""Tensor checksums (FORMAT.md "Checksum"): XXH64 over rows of the original bytes, then over the digests.

A tensor's bytes are cut into rows of ``chunk_elems * itemsize`` bytes (the last may be
shorter; an empty tensor has no rows). Each row gets XXH64 with seed 0; the tensor's checksum
is XXH64 (seed 0) of those digests written as little-endian u64, one after the other. Rows are
independent, so the CPU threads and the GPU compute them in parallel.
"""
from __future__ import annotations

import numpy as np
import xxhash

try:  # the C helper's XXH64 releases the GIL (python-xxhash holds it), so threads hash in parallel
    from ._accel import xxh64 as _xxh64
except ImportError:
    _xxh64 = None


def row_digest(row) -> int:
    return _xxh64(row) if _xxh64 is not None else xxhash.xxh64_intdigest(row)


def combine(digests) -> int:
    return xxhash.xxh64_intdigest(np.asarray(digests, dtype="<u8").tobytes())


def tensor_checksum(data: np.ndarray, row_bytes: int) -> int:
    """Reference: the checksum of a whole tensor's bytes (uint8 array)."""
    return combine([row_digest(data[i:i + row_bytes]) for i in range(0, data.size, row_bytes)])
