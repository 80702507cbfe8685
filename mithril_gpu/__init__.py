"""mithril-gpu: lossless compression of PyTorch checkpoints, on the GPU or the CPU, one format.

>>> import mithril_gpu
>>> mithril_gpu.save(model.state_dict(), "ckpt.mth")
>>> state = mithril_gpu.load("ckpt.mth")

Importing this package never needs CUDA, CuPy or nvCOMP; torch is imported on first use.
"""
from .api import load, open, save  # noqa: A004
from .container import VERSION as FORMAT_VERSION
from .errors import (BackendUnavailableError, BaseConflictError, BaseMismatchError, ChecksumMismatchError, CorruptFileError,
                     FormatError, GpuError, IncompleteCheckpointError, MissingBaseError, MithrilError, NotMithrilFileError,
                     StateMismatchError, TruncatedFileError, UnsupportedValueError, UnsupportedVersionError)
from .reader import MthFile
from . import api, tree  # noqa: F401  (submodules used by tools: tree.encode, api.tensor_bytes)

__version__ = "0.1.0"

__all__ = [
    "save", "load", "open", "MthFile", "FORMAT_VERSION", "MithrilError", "FormatError",
    "NotMithrilFileError", "UnsupportedVersionError", "TruncatedFileError", "CorruptFileError",
    "ChecksumMismatchError", "UnsupportedValueError", "BaseMismatchError", "MissingBaseError", "BaseConflictError",
    "BackendUnavailableError", "GpuError", "StateMismatchError", "IncompleteCheckpointError", "Checkpointer",
]


def __getattr__(name):
    if name == "Checkpointer":
        from .checkpointer import Checkpointer

        return Checkpointer
    raise AttributeError(name)
