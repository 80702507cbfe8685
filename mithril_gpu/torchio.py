"""The one bridge between torch tensors and bytes.

Every other module that turns a tensor into bytes (to save it) or bytes into a tensor (to load
it) calls this one: the API, the reader, the lazy slices and the GPU backend. Importing it does
not import torch; its functions do.

A tensor's bytes are its elements in C order, little-endian (FORMAT.md), as a flat uint8
buffer: a numpy array on the host, a torch uint8 tensor on a device.
"""
from __future__ import annotations

import numpy as np

from . import dtypes
from .container import MAX_RANK
from .errors import MithrilError, UnsupportedValueError, short


def is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def check_storable(t) -> None:
    """Raise :class:`UnsupportedValueError` for a tensor whose bytes cannot be stored as they are:
    sparse or other non-strided layouts, quantized tensors, and tensors on the meta device (which
    have no data)."""
    import torch

    if any(c.__name__ == "DTensor" for c in type(t).__mro__):
        raise UnsupportedValueError("cannot store a DTensor (one rank's part of a distributed tensor): save the "
                                    "state through torch.distributed.checkpoint with mithril_gpu.dcp.MithrilWriter, "
                                    "or call .full_tensor() first")
    if t.layout != torch.strided or t.is_nested:
        raise UnsupportedValueError(f"cannot store a {'nested' if t.is_nested else t.layout} tensor: convert it "
                                    "to dense first")
    if t.is_quantized:
        raise UnsupportedValueError("cannot store a quantized tensor")
    if t.device.type == "meta":
        raise UnsupportedValueError("cannot store a tensor on the meta device: it has no data")
    if t.dim() > MAX_RANK:
        raise UnsupportedValueError(f"cannot store a tensor of {t.dim()} dimensions (readers accept at most {MAX_RANK})")


def tensor_u8(t):
    """A tensor's little-endian bytes as a flat uint8 torch tensor on its own device (a copy only
    if it is not contiguous or has a lazy conjugate/negation bit). The caller's tensor is never
    written to."""
    import torch

    check_storable(t)
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        try:                 # (a view with a stride of 0 may expand a few bytes to more than memory holds)
            t = t.contiguous()
        except (RuntimeError, MemoryError) as e:
            if t.device.type != "cpu" or ("alloc" not in str(e).lower() and not isinstance(e, MemoryError)):
                raise               # (a device's out of memory is the GPU backend's to handle)
            raise MithrilError(f"not enough memory to lay out a {tuple(t.shape)} {t.dtype} tensor "
                               f"({t.numel() * t.element_size():,} bytes; it is a view of "
                               f"{t.untyped_storage().nbytes():,} bytes of storage)") from None
    t = t.reshape(-1)
    if t.numel() == 1 and t.stride(0) != 1:     # one element is "contiguous" whatever its stride
        t = t.as_strided((1,), (1,))
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def tensor_bytes(t) -> np.ndarray:
    """The bytes of a CPU tensor as a read-only numpy uint8 view (see :func:`tensor_u8`)."""
    a = tensor_u8(t).numpy()
    a.flags.writeable = False
    return a


def source_for(t):
    """Bytes of a tensor, or a callable that fetches them later (device tensors: one at a time)."""
    if t.device.type == "cpu":
        return tensor_bytes(t)
    check_storable(t)               # before anything is written, not when its turn comes
    return lambda: tensor_bytes(t.detach().to("cpu"))


def takes_bytes(t) -> bool:
    """Whether tensor ``t``'s memory can take decoded bytes as they are (one contiguous block with
    no lazy conjugate or negation bit: :func:`tensor_u8` is then a view of it)."""
    return t.is_contiguous() and not t.is_conj() and not t.is_neg()


def writable_bytes(t) -> np.ndarray | None:
    """The memory of CPU tensor ``t`` as a writable flat uint8 numpy array, or None when it cannot
    take decoded bytes as they are (:func:`takes_bytes`)."""
    if t.device.type != "cpu" or not takes_bytes(t):
        return None
    return tensor_u8(t).numpy()


def empty_u8(nbytes: int, what: str, device=None):
    """A fresh flat uint8 tensor of ``nbytes`` (on ``device``), or a typed error when there is no memory for it."""
    import torch

    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    except (RuntimeError, MemoryError):     # torch says "DefaultCPUAllocator: can't allocate memory ..."
        raise MithrilError(f"cannot allocate {nbytes} bytes for {what}: not enough memory") from None


def as_tensor(buf, dtype: dtypes.DType, shape):
    """Flat uint8 tensor ``buf`` viewed as a tensor of ``dtype`` and ``shape`` (no copy)."""
    return buf.view(dtypes.to_torch(dtype)).reshape(shape)


def new_tensors(f, entries, progress=None) -> list:
    """Decode ``entries`` of open file ``f`` into fresh CPU tensors, one buffer each."""
    bufs = [empty_u8(e.nbytes, f"tensor {short(e.name)!r}") for e in entries]
    f.decode_into(entries, [b.numpy() for b in bufs], progress)
    return [as_tensor(b, e.dtype, e.shape) for e, b in zip(entries, bufs)]


def to_device(t, device):
    if device in (None, "cpu"):
        return t
    return t.to(device)
