"""Run the real CUDA kernels (kernels/*.cu) on the CPU: compile them with g++ and
tests/cuda_host_shim.h, then launch them over a small grid, thread after thread."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(HERE), "kernels")
CXX = shutil.which("g++") or shutil.which("c++")
GRID, BLOCK = 3, 7          # few, odd-sized: the grid-stride loops must cover everything anyway

_cache: dict = {}


class Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


def signatures(code: str) -> dict[str, list[str]]:
    """{kernel: [parameter types]} as the source declares them (BYTEGROUP macro expanded)."""
    out = {}
    for name, paste, params in re.findall(r'extern "C" __global__ void (\w+?)(##SUF)?\(([^)]*)\)', code):
        types = [re.match(r"(.*?)\w+\s*$", p.strip()).group(1).strip() for p in params.split(",") if p.strip()]
        if paste:
            for ctype, suf in re.findall(r"^BYTEGROUP\((\w+), (\d+)\)", code, re.M):
                out[name + suf] = [t.replace("T ", ctype + " ").replace("T*", ctype + "*") for t in types]
        else:
            out[name] = types
    return out


class HostModule:
    def __init__(self, code: str):
        key = hashlib.sha256(code.encode()).hexdigest()[:16]
        lib = _cache.get(key)
        if lib is None:
            d = tempfile.mkdtemp(prefix="mithril-cuda-host-")
            src, so = os.path.join(d, "k.cu"), os.path.join(d, "k.so")
            with open(src, "w") as f:
                f.write(code)
            subprocess.run([CXX, "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-x", "c++", "-include",
                            os.path.join(HERE, "cuda_host_shim.h"), src, "-o", so], check=True, capture_output=True)
            lib = _cache[key] = ctypes.CDLL(so)
        self.lib, self.sigs = lib, signatures(code)

    def get_function(self, name: str):
        types = self.sigs[name]
        fn = getattr(self.lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p if "*" in t else (ctypes.c_longlong if t == "i64" else ctypes.c_int)
                       for t in types]
        lib = self.lib

        def launch(grid, block, args):
            assert len(args) == len(types), f"{name} takes {len(types)} arguments, got {len(args)}"
            conv = []
            for a, t in zip(args, types):
                if "*" in t:
                    conv.append(None if (isinstance(a, int) and a == 0) else np.asarray(a).ctypes.data)
                else:           # CuPy passes a scalar at its own width: an i64 must be given as int64, an int as int32
                    want = np.int64 if t == "i64" else np.int32
                    assert isinstance(a, want), f"{name}: a {t} argument given as {type(a).__name__}"
                    conv.append(int(a))
            Dim3.in_dll(lib, "gridDim").x, Dim3.in_dll(lib, "blockDim").x = GRID, BLOCK
            for b in range(GRID):
                Dim3.in_dll(lib, "blockIdx").x = b
                for t in range(BLOCK):
                    Dim3.in_dll(lib, "threadIdx").x = t
                    fn(*conv)
        return launch


def module(name: str) -> HostModule:
    with open(os.path.join(KERNELS, f"{name}.cu")) as f:
        return HostModule(f.read())
