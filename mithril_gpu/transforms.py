"""Plane transforms: the numpy reference implementation of FORMAT.md section "Transforms".

A transform turns ``count`` elements of a dtype (little-endian bytes) into planes, each plane
holding ``width`` bytes per element, and back. This module is the definition the C helper
(``_accel``) and the CUDA kernels (``kernels/planes.cu``) are tested against: they must produce
byte-identical planes.

* ``raw``        one plane, the element bytes as they are.
* ``bytegroup``  ``itemsize`` planes of one byte; plane k holds byte k of every element.
* ``fieldsplit`` (BF16, F16, F32) plane 0 holds the exponent field (one byte per element);
  the remaining bits, ``rest = sign << man_bits | mantissa``, form an unsigned integer of
  ``ceil((1 + man_bits) / 8)`` bytes that is byte-grouped into planes 1, 2, ...
* ``masked``     plane 0 is a bitmap of the nonzero elements (bit i%8 of byte i//8, so
  ``np.packbits(x != 0, bitorder="little")``); planes 1..itemsize byte-group the nonzero
  elements only. Plane sizes depend on the row's nonzero count, which the index records.
  Meant for deltas between checkpoints, where most elements are often zero.
"""
from __future__ import annotations

import numpy as np

from .dtypes import DType

TRANSFORMS = ("raw", "bytegroup", "fieldsplit", "masked")

_UINT = {1: np.uint8, 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def rest_bytes(dt: DType) -> int:
    return (1 + dt.man_bits + 7) // 8


def plane_widths(dt: DType, transform: str) -> list[int]:
    """Bytes per element of each plane, in plane order."""
    if transform == "raw":
        return [dt.itemsize]
    if transform in ("bytegroup", "masked"):   # masked: the mask plane, then one plane per byte
        return [1] * (dt.itemsize + (transform == "masked"))
    if transform == "fieldsplit":
        if not dt.has_fieldsplit:
            raise ValueError(f"fieldsplit is not defined for {dt.name}")
        return [1] * (1 + rest_bytes(dt))
    raise ValueError(f"unknown transform {transform!r}")


def valid_for(dt: DType, transform: str) -> bool:
    if transform == "fieldsplit":
        return dt.has_fieldsplit
    return transform in TRANSFORMS


def default_transform(dt: DType) -> str:
    """The transform save() uses when none is asked for (chosen by measurement, see STATUS.md)."""
    if dt.name in ("BF16", "F32"):
        return "fieldsplit"
    if dt.itemsize == 1:
        return "raw"
    return "bytegroup"


def _fields(dt: DType):
    bits = dt.itemsize * 8
    return bits, dt.exp_bits, dt.man_bits, _UINT[dt.itemsize]


def plane_sizes(dt: DType, transform: str, count: int, nnz: int | None = None) -> list[int]:
    """Uncompressed bytes of each plane of a row of ``count`` elements (``nnz`` nonzero)."""
    if transform == "masked":
        return [(count + 7) // 8] + [nnz] * dt.itemsize
    return [count * w for w in plane_widths(dt, transform)]


def split_masked(dt: DType, src: np.ndarray) -> tuple[int, list[np.ndarray]]:
    """The ``masked`` planes of ``src``: (nonzero count, [mask, byte planes of the nonzeros])."""
    x = src.view(_UINT[dt.itemsize])
    nz = x != 0
    vals = x[nz].view(np.uint8).reshape(-1, dt.itemsize)
    return int(vals.shape[0]), [np.packbits(nz, bitorder="little")] + [vals[:, k].copy() for k in range(dt.itemsize)]


def merge_masked(dt: DType, planes: list, out: np.ndarray) -> None:
    """Inverse of :func:`split_masked` into ``out`` (uint8, whole elements)."""
    count = out.size // dt.itemsize
    nz = np.unpackbits(np.frombuffer(planes[0], np.uint8), count=count, bitorder="little").view(bool)
    nnz = len(planes[1]) if dt.itemsize else 0
    if int(nz.sum()) != nnz:
        raise ValueError(f"mask has {int(nz.sum())} nonzero elements, planes hold {nnz}")
    vals = np.empty((nnz, dt.itemsize), np.uint8)
    for k in range(dt.itemsize):
        vals[:, k] = np.frombuffer(planes[1 + k], np.uint8)
    x = out.view(_UINT[dt.itemsize])
    x[...] = 0
    x[nz] = vals.reshape(-1).view(_UINT[dt.itemsize])


def split(dt: DType, transform: str, src: np.ndarray, planes: list[np.ndarray]) -> None:
    """Write the planes of ``src`` (uint8, count*itemsize bytes) into ``planes`` (uint8 arrays)."""
    if transform == "raw":
        planes[0][...] = src
        return
    count = src.size // dt.itemsize
    if transform == "bytegroup":
        grouped = src.reshape(count, dt.itemsize)
        for k in range(dt.itemsize):
            planes[k][...] = grouped[:, k]
        return
    bits, e, m, ut = _fields(dt)
    x = src.view(ut)
    planes[0][...] = (x >> m) & ((1 << e) - 1)
    rest = ((x >> (bits - 1)) << m) | (x & ((1 << m) - 1))
    for k in range(rest_bytes(dt)):
        planes[1 + k][...] = (rest >> (8 * k)) & 0xFF


def merge(dt: DType, transform: str, planes: list[np.ndarray], out: np.ndarray) -> None:
    """Inverse of :func:`split`: rebuild the element bytes from ``planes`` into ``out`` (uint8)."""
    if transform == "raw":
        out[...] = planes[0]
        return
    count = out.size // dt.itemsize
    if transform == "bytegroup":
        grouped = out.reshape(count, dt.itemsize)
        for k in range(dt.itemsize):
            grouped[:, k] = planes[k]
        return
    bits, e, m, ut = _fields(dt)
    rest = np.zeros(count, ut)
    for k in range(rest_bytes(dt)):
        rest |= planes[1 + k].astype(ut) << ut.type(8 * k)
    x = out.view(ut)
    sign = (rest >> ut.type(m)) << ut.type(bits - 1)
    x[...] = sign | (planes[0].astype(ut) << ut.type(m)) | (rest & ut.type((1 << m) - 1))
