"""Every CUDA kernel compiles with this machine's nvcc for Ampere and Hopper (no GPU needed)."""
import glob
import os
import shutil
import subprocess

import pytest

KERNELS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "*.cu")))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def test_there_are_kernels():
    assert {os.path.basename(k) for k in KERNELS} >= {"planes.cu", "checksum.cu"}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA kernels not compiled here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", KERNELS, ids=os.path.basename)
def test_kernel_compiles(tmp_path, path, arch):
    out = subprocess.run([NVCC, "-arch=" + arch, "-cubin", "-Werror", "all-warnings", "-o", str(tmp_path / "k.cubin"),
                          path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernels_use_no_host_headers():
    """cupy.RawModule compiles with NVRTC, which has no host headers."""
    for path in KERNELS:
        assert "#include" not in open(path).read(), path
