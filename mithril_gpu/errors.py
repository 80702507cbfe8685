"""Every error mithril raises on purpose. All derive from :class:`MithrilError`.

The rule: bad input (a truncated, corrupted, foreign or lying file; a wrong delta base; a
value that cannot be stored) raises one of these with a one-line message that says what is
wrong and, where there is something to do, what to do. Never a crash, a hang or a huge
allocation.
"""


class MithrilError(Exception):
    """Base class of all mithril errors."""


class FormatError(MithrilError):
    """The file cannot be decoded: it is not .mth, is of an unknown version, or is damaged."""


class NotMithrilFileError(FormatError):
    """The file does not start with the .mth magic bytes (wrong file, or not compressed yet)."""


class UnsupportedVersionError(FormatError):
    """The file is a .mth file of a version or feature this reader does not implement."""


class TruncatedFileError(FormatError):
    """The file ends before its trailer says it should (an interrupted copy or download)."""


class CorruptFileError(FormatError):
    """The file's index or data fails validation (flipped bits, lying sizes, bad codec data)."""


class ChecksumMismatchError(CorruptFileError):
    """A tensor decoded to bytes whose checksum differs from the one recorded at save time."""


class IncompleteCheckpointError(FormatError):
    """A checkpoint directory without its commit point (a DCP checkpoint without a committed
    metadata file, or with a rank file missing): its save did not finish, or it is not one."""


class UnsupportedValueError(MithrilError, TypeError):
    """save() was given a value it cannot store without pickle (a custom object, say)."""


class BaseMismatchError(MithrilError):
    """A delta checkpoint was given a base that is not the one it was written against."""


class MissingBaseError(BaseMismatchError):
    """A delta checkpoint's base file cannot be found."""


class BaseConflictError(MithrilError, ValueError):
    """``save(base=...)``: the base cannot be used for the file being written: it is that file,
    or its chain of bases holds it (the save would replace a file the chain needs)."""


class StateMismatchError(MithrilError, ValueError):
    """``load(into=...)``: the tensors given do not match the file's (names, dtypes or shapes)."""


class BackendUnavailableError(MithrilError):
    """An explicitly requested backend (e.g. device='cuda') cannot run here."""


class GpuError(MithrilError):
    """The GPU backend failed (a CUDA or nvCOMP error: the device, not the data). A save that
    raises it has written nothing; ``MITHRIL_GPU=0`` codes on the CPU instead."""


def short(text, limit: int = 120) -> str:
    """``text`` (a name or path put in an error message) cut to ``limit`` characters, its middle
    elided, and with characters that cannot be printed (lone surrogates, controls) escaped, so a
    message stays one printable line whatever a file holds."""
    s = str(text)
    if len(s) <= limit and s.isascii() and s.isprintable():     # (the common case, cheaply: a file
        return s                                                # opens with a call per tensor)
    if len(s) > limit:
        keep = (limit - 3) // 2
        s = s[:keep] + "..." + s[-keep:]
    if not s.isprintable() or any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        s = s.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)
    return s
