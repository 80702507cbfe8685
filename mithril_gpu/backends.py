"""Choosing a backend at run time. Importing this (or the package) never imports CUDA, CuPy or nvCOMP."""
from __future__ import annotations

import warnings

from .errors import BackendUnavailableError


class BackendNote(UserWarning):
    """A one-line note that work ran on another backend than the data suggested, and why."""


def gpu_status() -> tuple[bool, str]:
    """(usable, reason) for the GPU backend; imports CuPy and nvCOMP only when called."""
    from . import gpu

    return gpu.status()


def choose_encoder(device: str, tensors: list, level: int | None = None):
    """The encode function for ``save``: None means the CPU backend. A zstd ``level`` is the
    CPU path's alone (nvCOMP's zstd has none): with ``device="auto"`` it keeps the save on the
    CPU, with a note; ``device="cuda"`` and a level are refused together."""
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device == "cpu":
        return None
    on_cuda = any(getattr(t, "is_cuda", False) for t in tensors)
    if device == "auto" and not on_cuda:
        return None
    if level is not None:
        if device != "auto":
            raise ValueError(f"level={level} applies to the CPU path only (nvCOMP's zstd has no level): "
                             f"give device={device!r} or level, not both")
        warnings.warn(f"mithril: compressing on the CPU: level={level} applies to the CPU path only "
                      "(nvCOMP's zstd has no level)", BackendNote, stacklevel=3)
        return None
    ok, why = gpu_status()
    if ok:
        from . import gpu

        return gpu.encode_all
    if device != "auto":
        raise BackendUnavailableError(f"device={device!r} asked for the GPU backend, but {why}")
    warnings.warn(f"mithril: compressing on the CPU: {why}", BackendNote, stacklevel=3)
    return None


def check_load_device(device: str) -> None:
    if device in (None, "cpu"):
        return
    if not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    import torch

    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if not torch.backends.cuda.is_built() else "no CUDA device is visible"
        raise BackendUnavailableError(f"device={device!r}: {why}; load to the CPU (device='cpu') instead")


def use_gpu_for_load(device) -> bool:
    """Whether load(device=...) decodes on the GPU: a CUDA device asked for and the backend usable."""
    if device is None or not str(device).startswith("cuda"):
        return False
    ok, why = gpu_status()
    if not ok:
        warnings.warn(f"mithril: decoding on the CPU, then copying to {device}: {why}", BackendNote, stacklevel=4)
    return ok
