"""Server settings, read once from flags and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    index: Path
    token: str | None = field(default_factory=lambda: os.environ.get("DINOSEARCH_TOKEN") or None)
    max_upload_bytes: int = 32 * 2**20
    upload_timeout: float = 30.0  # seconds an upload may stall before it is dropped (408)
    max_pixels: int = 150_000_000  # baseline JPEG uploads (decoded at reduced size) and indexed photos
    # other uploads (decoded whole: PNG, WebP, GIF, TIFF, HEIF, progressive JPEG): 40 MP is above every
    # screen (8K: 33 MP), A4 scan at 600 dpi (35 MP) and the 12-24 MP photos cameras and phones save by default,
    # and a 40 MP PNG decodes in 0.8 s with 0.3 GB (measured); a 12000x12000 PNG bomb (144 MP) is refused from its header
    max_upload_pixels: int = 40_000_000
    max_decodes: int = 2  # uploads decoded and searched at once; more wait up to decode_wait s, then 503
    decode_wait: float = 5.0
    host: str = "127.0.0.1"  # the address the server is bound to: its names are the Host headers answered
    allowed_hosts: tuple[str, ...] = ()  # more Host names to answer (a reverse proxy's, a LAN name)
    allowed_roots: tuple[Path, ...] = ()  # index jobs may only add folders below these (empty: any folder)
    max_k: int = 1000
    model: str | None = None  # None: the index's model
    device: str = "auto"
    precision: str = "auto"  # auto: the index's own (a new index: by device and CPU flags)
    nprobe: int = 32  # IVF lists visited per query
    workers: int = 1  # decode processes of index jobs
    commit_every: int = 200  # photos between a job's commits: searches see new photos this often
    compact_every: float = 0.0  # seconds between background compactions (0: none)
    store: str | None = None  # external vector store to search (default: the index's own)
    watch: tuple[Path, ...] = ()  # folders kept in step with the index: an index job for each burst of changes
    watch_interval: float = 60.0  # seconds between scans of a watched folder the OS cannot watch (inotify limit)

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < 16:
            raise ConfigError("DINOSEARCH_TOKEN must be at least 16 characters (write routes are guarded by it)")
