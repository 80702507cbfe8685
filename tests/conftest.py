import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")


def subprocess_env(**extra) -> dict:
    """The environment for a child Python: this checkout first on PYTHONPATH, the caller's
    PYTHONPATH kept after it (packages installed with pip --target live there)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}

ALL_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
              torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
              torch.float8_e4m3fn, torch.float8_e5m2]


def random_tensor(dtype, shape, seed=0):
    """Random bit patterns (NaNs, infinities, -0.0 and subnormals included) of any dtype."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)

def ctx_for(dt):
    """The context a test forces on a context-sorted delta: the writer's default for floats, some
    high bits for integers."""
    from mithril_gpu import ctxdelta

    c = ctxdelta.default_ctx(dt)
    if c is not None:
        return c
    bits = 8 * dt.itemsize
    return (max(0, bits - 5), min(4, bits)) if dt.name != "BOOL" else (0, 1)


def bits(t):
    """A tensor's bytes, for bit-exact comparison (NaN != NaN does not get in the way)."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return bytes(t.view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def assert_same(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert tuple(a.shape) == tuple(b.shape), (a.shape, b.shape)
    assert bits(a) == bits(b)


def assert_tree_same(a, b):
    """Two nests of containers, tensors and values are the same, tensors bit for bit."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, torch.Tensor):
        assert_same(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_tree_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_same(x, y)
    else:
        assert a == b


@pytest.fixture
def minilm_bf16():
    from safetensors.torch import load_file

    return load_file(os.path.join(FIXTURES, "minilm_l0_bf16.safetensors"))


def _names(fds):
    """The file names behind open descriptors (Linux), which are then closed: what
    ``writer._drop_cached`` was handed, for tests that stand in for it."""
    out = []
    for fd in fds:
        out.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        os.close(fd)
    return out
