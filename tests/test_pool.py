"""Decode workers: a file that takes too long is given up and its worker replaced; workers die with their parent."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import sample_photos

from indexer.pool import DecodePool, decoded_in_order
from indexer.reader import DecodeJob, FileInfo
from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import Snapshot

TIMEOUT = 0.5  # a small photo decodes in ~5 ms, the slow one below in ~1.5 s


def slow_png(side: int = 10_000) -> bytes:
    """A valid 100 MP PNG of ~300 KB (zeros compress well) whose decode takes over a second: a stand-in for a stalled read."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * side)
    idat = b"".join([z.compress(row) for _ in range(side)] + [z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slow")
    photos = sample_photos(1)[:6]
    for i, p in enumerate(photos):
        (folder / f"{i:02d}_{p.name}").write_bytes(p.read_bytes())
    (folder / "03_slow.png").write_bytes(slow_png())
    return folder


def _files(folder: Path) -> list[FileInfo]:
    return [FileInfo(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_over_the_timeout_is_given_up_and_the_rest_decode(slow_folder, workers):
    files = _files(slow_folder)
    pool = DecodePool(workers) if workers else None
    try:
        old = set(pool._pool._processes) if pool else set()
        t = time.monotonic()
        out = list(decoded_in_order(files, DecodeJob(56, timeout=TIMEOUT), pool, window=8))
        took = time.monotonic() - t
        assert [d.path for d in out] == [f.path for f in files]  # in order, none lost
        for d in out:
            if d.path.endswith("slow.png"):
                assert d.pixels is None and d.error.startswith(f"gave up after {TIMEOUT:g} s"), d.error
            else:
                assert d.error is None and d.pixels.shape == (56, 56, 3), (d.path, d.error)
        if pool:
            assert pool.restarts == 1
            assert not any(_alive(pid) for pid in old)  # the stuck worker (and its siblings) were killed...
            assert pool._pool._processes and set(pool._pool._processes).isdisjoint(old)  # ...and replaced
            assert took < 20
    finally:
        if pool:
            pool.shutdown()


def test_index_records_a_file_over_the_timeout_and_goes_on(slow_folder, embedder, tmp_path):
    stats = index_folder(slow_folder, tmp_path / "idx", embedder, IndexConfig(workers=1, progress=False, decode_timeout=TIMEOUT))
    assert (stats.indexed, stats.failed) == (6, 1)
    rows = Snapshot.open(tmp_path / "idx").catalog().execute("SELECT path, error FROM photos WHERE status='failed'").fetchall()
    assert [(os.path.basename(os.fsdecode(p)), e.split(":")[0]) for p, e in rows] == [("03_slow.png", f"gave up after {TIMEOUT:g} s")]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_and_resource_tracker_die_with_a_killed_index_run(slow_folder, tiny_model, tmp_path):
    """SIGKILL `dinosearch index` while its decode workers run: none of its processes outlive it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(30):  # the slow photo keeps the run busy well past start-up
        (folder / f"slow_{i:02d}.png").symlink_to(slow_folder / "03_slow.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "index", str(folder), "--index", str(tmp_path / "idx"),
                             "--model", str(tiny_model), "--workers", "2", "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its workers were seen"
            family = _descendants(proc.pid)
            workers = [p for p in family if "spawn_main" in _cmdline(p)]
            if len(workers) == 2:
                break
            time.sleep(0.1)
        time.sleep(3)  # the workers are decoding now (their initializer ran long ago)
        family = _descendants(proc.pid)
        assert any("resource_tracker" in _cmdline(p) for p in family), [_cmdline(p) for p in family]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [(p, _cmdline(p)) for p in family if _alive(p)]
