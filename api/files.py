"""Serve only what was indexed: a photo's bytes are read through its catalog row, and only while they are
still the very bytes that were indexed.

The catalog holds, per photo, its path, size, mtime and the blake2b of its content. A path is a name in
someone's folder, and what sits under that name can change after indexing: a file replaced by a symlink to
/etc/shadow, a failed row's symlink to /etc/passwd, a FIFO, a file grown or rewritten. So:

- only rows with status 'indexed' are served (a failed row is not a photo: 404);
- the path is opened with O_NOFOLLOW | O_NONBLOCK (no hang on a FIFO, no device opened through a link);
  a symlink as the last component is followed only if it leads to a regular file (the scan follows file
  symlinks, so a collection may legitimately hold them);
- everything else is checked on the opened descriptor (fstat: a regular file of the recorded size), and the
  bytes read from it must hash to the recorded blake2b before one of them is sent. Where the bytes come from
  (which root, which link) then no longer matters: nothing is served that is not exactly what was indexed,
  and there is no window between check and use (the checked bytes are the sent bytes).

Anything that fails a check is 410 (the photo was indexed; its file is gone or is something else now).
"""

from __future__ import annotations

import errno
import mimetypes
import os
import stat

from indexer import catalog
from indexer.errors import DinosearchError
from indexer.reader import content_hash
from search import UnknownPhoto


class PhotoGone(DinosearchError):
    """An indexed photo whose file is gone, unreadable or no longer what was indexed (HTTP 410)."""


def _gone(photo_id: int, why: str) -> PhotoGone:
    return PhotoGone(f"photo {photo_id} was indexed but {why}; index its folder again")


def _open(path: bytes, photo_id: int) -> int:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise _gone(photo_id, f"its file cannot be opened ({e.strerror})") from None
    try:  # the name is a symlink: follow it only to a regular file (never open a device or FIFO through it)
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _gone(photo_id, "its name is now a link to something that is not a regular file")
        return os.open(path, flags)
    except OSError as e:
        raise _gone(photo_id, f"its file cannot be opened ({e.strerror})") from None


def read_indexed(db, photo_id: int) -> tuple[bytes, str, str]:
    """The bytes of an indexed photo, checked to be exactly what was indexed; with its media type and hash.
    Raises UnknownPhoto (404) for an id that is not an indexed photo, PhotoGone (410) otherwise."""
    row = catalog.photo_file(db, photo_id)
    if row is None or row[3] != "indexed":
        raise UnknownPhoto(f"photo id {photo_id} is not an indexed photo")
    path, size, digest = bytes(row[0]), int(row[1]), row[2]
    fd = _open(path, photo_id)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _gone(photo_id, "its path is no longer a regular file")
        if st.st_size != size:
            raise _gone(photo_id, f"its file changed since (now {st.st_size} bytes, indexed {size})")
        chunks, left = [], size + 1  # one byte more than recorded: a file that grew while read is caught
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise _gone(photo_id, f"its file cannot be read ({e.strerror})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if digest is None or len(data) != size or content_hash(data) != digest:
        raise _gone(photo_id, "its file's content is not what was indexed")
    kind = mimetypes.guess_type(os.fsdecode(path))[0]
    return data, kind if kind and kind.startswith("image/") else "application/octet-stream", digest
