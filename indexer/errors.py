"""Exceptions raised by the library; the CLI and HTTP layers turn them into messages."""


class DinosearchError(Exception):
    """Base class: the message is one line a person can act on."""


class WeightsUnavailable(DinosearchError):
    """Model weights are neither local nor reachable on the hub."""


class ModelMismatch(DinosearchError):
    """An index is queried or extended with a model other than the one that built it."""


class IndexFormatError(DinosearchError):
    """The index directory is missing, unreadable or of an unknown format."""


class IndexBusy(DinosearchError):
    """Another process is writing this index."""


class DecodeError(DinosearchError):
    """A file could not be turned into an RGB photo; the message is the reason."""


class ConfigError(DinosearchError):
    """An option value is impossible (wrong resolution, unknown device or precision)."""


class IndexWriteError(DinosearchError):
    """A commit could not be written (disk full, file size limit, read-only); the last snapshot is intact.
    ``errno``: the OS error behind it, if any (the HTTP layer maps read-only to 409, a full disk to 507)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class NotAnImage(DecodeError):
    """The bytes are no image format this program reads."""


class ImageTooLarge(DecodeError):
    """A file or photo above a size limit (bytes or pixels); refused before it is decoded."""
