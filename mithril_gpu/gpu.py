"""GPU backend placeholder until the CuPy/nvCOMP path lands (see STATUS.md)."""


def status() -> tuple[bool, str]:
    return False, "the GPU backend is not built yet"
