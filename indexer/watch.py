"""Watch: keep an index in step with a folder. File-system events (watchdog) are collected until the folder has
been quiet for ``debounce`` seconds, then the normal incremental run is called on the deepest folder holding every
change (a move between two subfolders is one run on their parent, so it stays a move). Where the OS cannot watch the
folder (inotify's watch or instance limit), the whole folder is scanned every ``interval`` seconds instead.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from indexer.errors import ConfigError, DecodeError

log = logging.getLogger(__name__)

# "1": behave as if the OS watch limit were reached, so the periodic-scan branch runs on any machine (tests)
SIMULATE_LIMIT_ENV = "DINOSEARCH_WATCH_LIMIT_REACHED"
LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE)  # inotify: watches (fs.inotify.max_user_watches), instances


@dataclass(frozen=True)
class WatchConfig:
    debounce: float = 2.0  # seconds of quiet after the last event before a run
    interval: float = 60.0  # seconds between scans when the folder cannot be watched

    def __post_init__(self) -> None:
        if self.debounce < 0 or self.interval <= 0:
            raise ConfigError(f"--watch-interval must be positive (got {self.interval:g}) and the debounce not negative")


class _Changes:
    """Folders with events since the last run, and when the last event came (filled by the observer's thread)."""

    def __init__(self, root: str, ignore: tuple[str, ...]):
        self.root, self.ignore = root, tuple(p.rstrip(os.sep) for p in ignore)
        self.lock = threading.Lock()
        self.folders: set[str] = set()
        self.last = 0.0

    def dispatch(self, event) -> None:  # watchdog's handler interface
        if event.event_type in ("opened", "closed_no_write", "attrib") or (event.is_directory and event.event_type == "modified"):
            # reads change nothing, and the decode's own reads open files and move their access times (attrib: a
            # touch or chmod alone waits for the next change); a folder "modified" comes with its entries' own events
            return
        paths = [p for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        folders = set()
        for p in map(os.fsdecode, paths):
            if any(p == i or p.startswith(i + os.sep) for i in self.ignore):
                continue  # the index's own writes, when it lies inside the folder
            folders.add(os.path.dirname(p) if p != self.root else p)
        if folders:
            with self.lock:
                self.folders |= folders
                self.last = time.monotonic()

    def take(self, debounce: float) -> str | None:
        """The deepest folder holding every change, once ``debounce`` seconds passed without an event; else None."""
        with self.lock:
            if not self.folders or time.monotonic() - self.last < debounce:
                return None
            folders, self.folders = self.folders, set()
        common = os.path.commonpath(list(folders))
        if common != self.root and not common.startswith(self.root + os.sep):
            return self.root
        while not os.path.isdir(common) and common != self.root:  # a folder removed whole: its parent holds the change
            common = os.path.dirname(common)
        return common


def _observer(root: str, handler: _Changes):
    """A started watchdog observer of ``root`` (recursive); OSError when the OS cannot watch it."""
    from watchdog.observers import Observer

    if os.environ.get(SIMULATE_LIMIT_ENV) == "1":
        raise OSError(errno.ENOSPC, f"inotify watch limit reached (simulated by {SIMULATE_LIMIT_ENV}=1)")
    observer = Observer()
    observer.schedule(handler, root, recursive=True)
    try:
        observer.start()
    except BaseException:
        observer.stop()
        raise
    return observer


def watch_folder(root: str | os.PathLike, run: Callable[[str], object], stop: threading.Event,
                 config: WatchConfig = WatchConfig(), *, ignore: tuple[str, ...] = (), initial: bool = False,
                 on_fallback: Callable[[str], None] = log.warning) -> None:
    """Call ``run(folder)`` for each burst of changes below ``root`` until ``stop`` is set (checked between runs, so a
    run always ends with its commit). ``ignore``: paths whose events are not changes (the index directory).
    ``initial``: one run on ``root`` first, once the watch has started (so no change during it is missed)."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DecodeError(f"not a folder: {root}")
    changes = _Changes(root, tuple(os.path.abspath(os.fspath(p)) for p in ignore))
    try:
        observer = _observer(root, changes)
    except OSError as e:
        if e.errno not in LIMIT_ERRNOS:
            raise
        on_fallback(f"cannot watch {root}: {e.strerror or e} (raise fs.inotify.max_user_watches to watch); "
                    f"scanning it every {config.interval:g} s instead")
        if initial:
            run(root)
        while not stop.wait(config.interval):
            run(root)
        return
    log.info("watching %s", root)
    try:
        if initial:
            run(root)
        while not stop.wait(0.1):
            folder = changes.take(config.debounce)
            if folder is not None:
                run(folder)
    finally:
        observer.stop()
        observer.join(5)
