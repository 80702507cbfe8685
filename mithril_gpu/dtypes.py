"""The element types a .mth file can hold (the safetensors set) and their float layouts."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedValueError


@dataclass(frozen=True)
class DType:
    name: str            # name in the file, as safetensors spells it
    itemsize: int        # bytes per element
    torch_name: str      # attribute of the torch module
    numpy: np.dtype | None  # numpy dtype with the same bits, or None (bf16, fp8)
    exp_bits: int = 0    # exponent-field width for the fieldsplit transform (0: not a float
    man_bits: int = 0    # that fieldsplit applies to); mantissa-field width

    @property
    def has_fieldsplit(self) -> bool:
        return self.exp_bits > 0


_ALL = [
    DType("BOOL", 1, "bool", np.dtype(np.bool_)),
    DType("U8", 1, "uint8", np.dtype(np.uint8)),
    DType("I8", 1, "int8", np.dtype(np.int8)),
    DType("I16", 2, "int16", np.dtype("<i2")),
    DType("U16", 2, "uint16", np.dtype("<u2")),
    DType("I32", 4, "int32", np.dtype("<i4")),
    DType("U32", 4, "uint32", np.dtype("<u4")),
    DType("I64", 8, "int64", np.dtype("<i8")),
    DType("U64", 8, "uint64", np.dtype("<u8")),
    DType("F16", 2, "float16", np.dtype("<f2"), exp_bits=5, man_bits=10),
    DType("BF16", 2, "bfloat16", None, exp_bits=8, man_bits=7),
    DType("F32", 4, "float32", np.dtype("<f4"), exp_bits=8, man_bits=23),
    DType("F64", 8, "float64", np.dtype("<f8")),
    DType("F8_E4M3", 1, "float8_e4m3fn", None),
    DType("F8_E5M2", 1, "float8_e5m2", None),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
_BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in _ALL}
_BY_NUMPY: dict[np.dtype, DType] = {d.numpy: d for d in _ALL if d.numpy is not None}


def from_name(name: str) -> DType:
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise KeyError(name) from None


def from_torch(torch_dtype) -> DType:
    key = str(torch_dtype).removeprefix("torch.")
    try:
        return _BY_TORCH_NAME[key]
    except KeyError:
        supported = ", ".join(sorted(_BY_TORCH_NAME))
        raise UnsupportedValueError(
            f"tensors of dtype {torch_dtype} cannot be stored; supported dtypes: {supported}"
        ) from None


def from_numpy(np_dtype) -> DType:
    d = np.dtype(np_dtype).newbyteorder("<") if np.dtype(np_dtype).byteorder == "=" else np.dtype(np_dtype)
    try:
        return _BY_NUMPY[d]
    except KeyError:
        raise UnsupportedValueError(f"numpy arrays of dtype {np_dtype} cannot be stored") from None


def to_torch(dt: DType):
    import torch

    return getattr(torch, dt.torch_name)
