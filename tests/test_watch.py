"""--watch: a real watch (inotify through watchdog) on a temporary folder keeps the index in step; the periodic-scan
fallback of a machine out of inotify watches, forced; Ctrl-C on `dinosearch index --watch`; `serve --watch`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import local_client, sample_photos
from test_cli import ENV
from test_index import assert_consistent, catalog_rows

from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import live_generation
from indexer.watch import SIMULATE_LIMIT_ENV, WatchConfig, watch_folder

CFG = IndexConfig(batch_size=4, workers=0, progress=False)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i, p in enumerate(sample_photos(1)[:4]):
        shutil.copy(p, root / "ab"[i % 2] / p.name)
    return root


def paths(idx) -> dict[str, int]:
    return {os.fsdecode(r[1]): r[0] for r in catalog_rows(idx) if r[2] == "indexed"} if live_generation(idx) is not None else {}


def until(cond, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.1)


@pytest.fixture
def watching(embedder, tmp_path):
    """Start watch_folder in a thread (the index lives in the watched folder: its own writes must not trigger runs);
    yields (runs, messages, start); stops and joins it afterwards."""
    stop, runs, messages, threads = threading.Event(), [], [], []

    def start(root, idx, config):
        def run(where):
            runs.append((where, index_folder(where, idx, embedder, CFG)))

        t = threading.Thread(target=watch_folder, args=(root, run, stop, config),
                             kwargs={"ignore": (str(idx),), "initial": True, "on_fallback": messages.append}, daemon=True)
        t.start()
        threads.append(t)

    yield runs, messages, start
    stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def test_a_watch_indexes_what_is_added_removed_and_moved(folder, watching):
    runs, messages, start = watching
    idx = folder / ".index"  # inside the watched folder: its commits are not changes

    def quiet(seconds: float = 2.0) -> None:
        """Until no run has started for ``seconds`` (a run may follow reads that touch access times; none may loop)."""
        deadline = time.time() + 60
        while True:
            k = len(runs)
            time.sleep(seconds)
            if len(runs) == k:
                return
            assert time.time() < deadline, f"runs keep starting: {[w for w, _ in runs]}"

    start(folder, idx, WatchConfig(debounce=0.3))
    until(lambda: len(paths(idx)) == 4, "the first run")
    quiet()  # the index's own commits trigger nothing (else runs would follow each other forever)
    assert runs[0][0] == str(folder) and sum(s.indexed for _, s in runs) == 4 and not messages
    n = len(runs)
    shutil.copy(sample_photos(1)[4], folder / "b" / "new.jpg")
    until(lambda: str(folder / "b" / "new.jpg") in paths(idx), "the added photo indexed")
    quiet()
    assert {w for w, _ in runs[n:]} == {str(folder / "b")} and sum(s.indexed for _, s in runs[n:]) == 1  # that folder only
    gone = sorted((folder / "a").glob("*.jpg"))[0]
    gone.unlink()
    until(lambda: str(gone) not in paths(idx), "the deleted photo gone")
    quiet()
    before, n = paths(idx), len(runs)
    moved = sorted((folder / "a").glob("*.jpg"))[0]
    os.rename(moved, folder / "b" / "moved.jpg")  # across subfolders: one run on their parent, so it is a move
    until(lambda: str(folder / "b" / "moved.jpg") in paths(idx), "the moved photo at its new path")
    assert sum(s.moved for _, s in runs[n:]) == 1 and sum(s.indexed for _, s in runs[n:]) == 0
    assert paths(idx)[str(folder / "b" / "moved.jpg")] == before[str(moved)]
    assert_consistent(idx)


def test_out_of_inotify_watches_falls_back_to_periodic_scans(folder, watching, monkeypatch, tmp_path):
    monkeypatch.setenv(SIMULATE_LIMIT_ENV, "1")
    runs, messages, start = watching
    idx = tmp_path / "idx"
    start(folder, idx, WatchConfig(interval=0.5))
    until(lambda: len(paths(idx)) == 4, "the first run")
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "inotify watch limit reached" in messages[0] and "scanning it every 0.5 s instead" in messages[0]
    shutil.copy(sample_photos(1)[4], folder / "a" / "new.jpg")
    until(lambda: str(folder / "a" / "new.jpg") in paths(idx), "the added photo indexed by a periodic scan")
    assert all(where == str(folder) for where, _ in runs)  # each scan covers the whole folder


def test_index_watch_command_stops_on_ctrl_c_after_its_commit(folder, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "index", str(folder), "--index", str(idx), "--model",
                             str(tiny_model), "-q", "--workers", "0", "--watch", "--watch-debounce", "0.3"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: len(paths(idx)) == 4, "the first run")
        shutil.copy(sample_photos(1)[4], folder / "a" / "new.jpg")
        until(lambda: len(paths(idx)) == 5, "the added photo indexed")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"watching {folder}") and lines[-1] == "stopped watching"
    assert lines[1].startswith("4 indexed") and any(line.startswith("1 indexed") for line in lines[2:])
    assert "stopping after the current run's commit" in err and "Traceback" not in err


def test_serve_watch_keeps_the_served_index_in_step(folder, tiny_model, tmp_path):
    from api.app import create_app
    from api.settings import Settings

    idx = tmp_path / "idx"
    settings = Settings(index=idx, model=str(tiny_model), device="cpu", workers=0, watch=(folder,))
    with local_client(create_app(settings)) as client:
        until(lambda: client.get("/health").status_code == 200 and len(paths(idx)) == 4, "the first job")
        shutil.copy(sample_photos(1)[4], folder / "b" / "new.jpg")
        until(lambda: client.get("/stats").json().get("photos_indexed") == 5, "the added photo served")
        jobs = client.get("/index/jobs").json()
        assert jobs[0]["folder"] == str(folder) and jobs[-1]["folder"] == str(folder / "b")  # then the changed folder only
        until(lambda: all(j["state"] == "done" for j in client.get("/index/jobs").json()), "the jobs done")


def test_bad_watch_values_are_one_line(folder, tiny_model, tmp_path):
    for args, want in ((["index", str(folder), "--index", str(tmp_path / "i"), "--watch", "--watch-interval", "0"],
                        "--watch-interval must be positive"),
                       (["serve", str(tmp_path / "i"), "--watch", str(tmp_path / "nope")], "no such folder")):
        p = subprocess.run([sys.executable, "-m", "api.cli", *args], env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and want in p.stderr, p.stderr
