"""The kernels compile with NVRTC, the compiler cupy.RawModule uses at run time (no GPU needed).
Runs where libnvrtc can be found: set MITHRIL_NVRTC to its path, or install nvidia-cuda-nvrtc."""
import ctypes
import glob
import os

import pytest

KERNELS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "*.cu")))


def _find_nvrtc():
    cands = [os.environ.get("MITHRIL_NVRTC", "")]
    try:
        import nvidia.cu13  # nvidia-cuda-nvrtc for CUDA 13 installs here: a namespace package (no __file__)
        for d in getattr(nvidia.cu13, "__path__", []):
            cands += glob.glob(os.path.join(d, "lib", "libnvrtc.so*"))
    except ImportError:
        pass
    cands += glob.glob("/usr/local/cuda/lib64/libnvrtc.so*")
    for c in cands:
        if c and os.path.exists(c):
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
    return None


NVRTC = _find_nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (set MITHRIL_NVRTC or pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("path", KERNELS, ids=os.path.basename)
def test_kernel_compiles_with_nvrtc(path, arch):
    prog = ctypes.c_void_p()
    src = open(path, "rb").read()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None) == 0
    opts = [b"--std=c++14", f"--gpu-architecture={arch}".encode()]
    res = NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    assert res == 0, log.value.decode(errors="replace")
