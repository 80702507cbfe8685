"""Delta ops against a base tensor: the numpy reference of FORMAT.md "Deltas".

Both ops work on elements as unsigned little-endian integers of the dtype's width B bits and
are applied before the plane transform (which is then ``bytegroup``, or ``raw`` for 1-byte
dtypes).

* ``xor``     d = x XOR b
* ``zigzag``  d = zigzag((key(x) - key(b)) mod 2^B), where for float dtypes
  key(v) = v XOR (all ones if v's sign bit is set, else the sign bit) - a bijection that orders
  floats by value, so nearby values give small differences - and key(v) = v for integer
  dtypes; zigzag(d) = (d << 1) XOR (d >> (B-1), arithmetic), mapping small |d| to small codes.
"""
from __future__ import annotations

import numpy as np

from .dtypes import DType

OPS = ("xor", "zigzag")
_UINT = {1: np.dtype(np.uint8), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_INT = {1: np.dtype(np.int8), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}


def is_float(dt: DType) -> bool:
    return dt.name.startswith(("F", "BF"))


def _key(v: np.ndarray, dt: DType) -> np.ndarray:
    if not is_float(dt):
        return v
    ut = v.dtype
    bits = ut.itemsize * 8
    sb = ut.type(1 << (bits - 1))
    neg = (v & sb) != 0
    return np.where(neg, ~v, v | sb).astype(ut)


def _unkey(k: np.ndarray, dt: DType) -> np.ndarray:
    if not is_float(dt):
        return k
    sb = k.dtype.type(1 << (k.dtype.itemsize * 8 - 1))
    return np.where((k & sb) != 0, k ^ sb, ~k).astype(k.dtype)


def encode(op: str, dt: DType, x: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
    """x, base, out: uint8 arrays of equal size (whole elements)."""
    ut = _UINT[dt.itemsize]
    xv, bv, ov = x.view(ut), base.view(ut), out.view(ut)
    if op == "xor":
        np.bitwise_xor(xv, bv, out=ov)
        return
    d = (_key(xv, dt) - _key(bv, dt)).astype(ut)           # wraps mod 2^B
    s = d.view(_INT[dt.itemsize])
    ov[...] = ((d << ut.type(1)) ^ (s >> (dt.itemsize * 8 - 1)).view(ut)).astype(ut)


def decode(op: str, dt: DType, d: np.ndarray, base: np.ndarray, out: np.ndarray) -> None:
    """Inverse of :func:`encode`: rebuild x from the delta and the base."""
    ut = _UINT[dt.itemsize]
    dv, bv, ov = d.view(ut), base.view(ut), out.view(ut)
    if op == "xor":
        np.bitwise_xor(dv, bv, out=ov)
        return
    diff = (dv >> ut.type(1)) ^ (ut.type(0) - (dv & ut.type(1)))
    ov[...] = _unkey((_key(bv, dt) + diff).astype(ut), dt)
