"""Progress reporting shared by the API and the CLI."""
from __future__ import annotations


class Progress:
    """A byte-count progress bar on stderr for ``progress=True`` (``"auto"``: only when stderr is
    a terminal); a callable passes through; None/False: none. Used as a context manager that
    gives the callable to report bytes with (or None)."""

    def __init__(self, progress, total: int, desc: str):
        self.bar = None
        self.fn = progress if callable(progress) else None
        if progress is True or progress == "auto":
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, leave=False,
                            file=sys.stderr, disable=None if progress == "auto" else False)
            self.fn = self.bar.update

    def __enter__(self):
        return self.fn

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
