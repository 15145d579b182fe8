"""Bad input, damaged indexes and storage faults: nothing is lost, every error is one clear line."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, free_port, local_client
from test_index import assert_consistent, catalog_rows

from api.app import create_app
from api.settings import Settings
from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import Snapshot
from indexer.verify import verify

sys.path.insert(0, str(REPO / "scripts"))
from make_hostile_corpus import add_runtime_cases, make  # noqa: E402

HOSTILE = REPO / "tests" / "data" / "hostile"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, env=ENV, timeout=600, **kw)


def test_committed_corpus_matches_its_generator(tmp_path):
    expect = make(tmp_path / "fresh")
    assert sorted(expect) == sorted(os.listdir(HOSTILE))


@pytest.fixture
def hostile(tmp_path):
    folder = tmp_path / "hostile"
    shutil.copytree(HOSTILE, folder)
    expect = make(tmp_path / "expect-only")  # names -> must index
    expect.update(add_runtime_cases(folder))
    return folder, expect


def test_every_hostile_file_indexes_or_is_recorded(hostile, embedder, tmp_path):
    folder, expect = hostile
    idx = tmp_path / "idx"
    stats = index_folder(folder, idx, embedder, IndexConfig(workers=1, progress=False))
    rows = Snapshot.open(idx).catalog().execute("SELECT path, status, error FROM photos").fetchall()
    got = {os.path.basename(os.fsdecode(p)): (s, e) for p, s, e in rows}
    photos = {name: must_index for name, must_index in expect.items() if must_index is not None}
    assert set(got) == set(photos), set(got) ^ set(photos)
    for name, must_index in photos.items():
        status, error = got[name]
        assert (status == "indexed") == must_index, (name, status, error)
        if status == "failed":
            assert error and "\n" not in error, name
    assert stats.indexed == sum(photos.values())
    assert stats.not_images == list(expect.values()).count(None)  # sidecars, videos, text: counted, not failed
    assert verify(idx).ok
    assert_consistent(idx)
    # the 8 EXIF orientations of one photo are 8 different photos once applied
    ids = {os.path.basename(os.fsdecode(p)): i for i, p in Snapshot.open(idx).catalog().execute("SELECT id, path FROM photos")}
    g = Snapshot.open(idx).global_index()
    vecs = {tuple(g.reconstruct(ids[f"exif_orientation_{o}.jpg"]).round(4)) for o in range(1, 9)}
    assert len(vecs) == 8


def test_hostile_folder_through_the_cli_summary_and_info(hostile, tiny_model, tmp_path):
    folder, expect = hostile
    idx = tmp_path / "idx"
    p = cli("index", str(folder), "--index", str(idx), "--model", str(tiny_model), "-q", "--workers", "1")
    assert p.returncode == 0, p.stderr
    n_ok, n_failed = list(expect.values()).count(True), list(expect.values()).count(False)
    skipped = list(expect.values()).count(None)
    assert f"{n_ok} indexed" in p.stdout and f"{n_failed} failed, {skipped} not images" in p.stdout, p.stdout
    assert "skipped " + str(folder / "pipe.jpg") + ": not a regular file (FIFO)" in p.stdout
    info = json.loads(cli("info", str(idx), "--json").stdout)
    assert (info["photos_indexed"], info["photos_failed"], info["not_images"]) == (n_ok, n_failed, skipped)
    assert info["not_images_by_extension"] == {"": 2, ".mov": 1, ".txt": 1, ".xmp": 1}  # README and a FIFO have no extension
    assert "not_images" in cli("info", str(idx)).stdout
    p = cli("index", str(folder), "--index", str(idx), "-q")  # again: nothing new, the same count
    assert p.returncode == 0 and "0 indexed" in p.stdout and f"{skipped} not images" in p.stdout, p.stdout


def test_hostile_uploads_get_4xx_and_the_server_stays_up(hostile, embedder, tmp_path):
    folder, expect = hostile
    idx = tmp_path / "idx"
    index_folder(folder, idx, embedder, IndexConfig(workers=0, progress=False))
    with local_client(create_app(Settings(index=idx, device="cpu"))) as client:
        for name, must_index in sorted(make(tmp_path / "again").items()):
            r = client.post("/search", files={"image": (name, (folder / name).read_bytes(), "application/octet-stream")})
            if must_index:
                assert r.status_code == 200 and r.json()["results"], (name, r.text)
            else:
                assert r.status_code in (400, 413, 415) and r.json()["detail"], (name, r.status_code, r.text)
            assert client.get("/health").status_code == 200


def test_verify_names_a_truncated_or_altered_file_and_repair_drops_its_segment(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    later = sorted(photos.rglob("*.jpg"))[-5:]
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in later:
        f.rename(hidden / f.name)
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    sorted(photos.rglob("*.jpg"))[0].unlink()
    for f in later:
        (hidden / f.name).rename(f)
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))  # a second segment: the 5 photos
    live = idx / "seg-000002"
    p = cli("verify", str(idx))
    assert p.returncode == 0 and p.stdout.startswith("ok:")

    patches = live / "patches.faiss"
    data = patches.read_bytes()
    patches.write_bytes(data[: len(data) // 2])  # truncated
    p = cli("verify", str(idx))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert str(patches) in p.stdout and "problem:" in p.stdout
    p = cli("info", str(idx))
    assert p.returncode == 2 and "patches.faiss is corrupt or truncated" in p.stderr and "Traceback" not in p.stderr

    g = live / "global.faiss"
    raw = bytearray(g.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the vectors: only the checksum can tell
    g.write_bytes(bytes(raw))
    assert any("global.faiss differs from what was committed" in x for x in verify(idx).problems)

    (idx / "seg-999999.tmp").mkdir()
    p = cli("verify", str(idx), "--repair", "--json")
    r = json.loads(p.stdout)
    assert p.returncode == 0 and r["ok"], r
    assert any("seg-999999.tmp" in x for x in r["repaired"]) and any("dropped damaged segment(s) seg-000002: 5 photos" in x
                                                                      for x in r["repaired"])
    assert r["counts"]["photos_indexed"] == 42 and not (idx / "seg-999999.tmp").exists()
    assert cli("search", str(idx), "2", "--id", "-k", "3").returncode == 0
    assert index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False)).indexed == 5  # embedded again
    assert verify(idx).ok


def test_disk_full_leaves_the_last_snapshot_intact(photos, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    half = tmp_path / "half"
    half.mkdir()
    files = sorted(photos.rglob("*.jpg"))
    for f in files[:10]:
        shutil.copy(f, half / f.name)
    assert cli("index", str(half), "--index", str(idx), "--model", str(tiny_model), "-q").returncode == 0
    before = Snapshot.open(idx).name
    for f in files[10:]:
        shutil.copy(f, half / f.name)

    def small_files() -> None:  # the writer may create no file over 64 KiB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    p = cli("index", str(half), "--index", str(idx), "--model", str(tiny_model), "-q", preexec_fn=small_files)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "could not write a new snapshot" in line and f"({before}) is intact" in line
    assert Snapshot.open(idx).name == before and verify(idx).ok
    assert not list(idx.glob("*.tmp"))
    assert cli("search", str(idx), "1", "--id").returncode == 0
    p = cli("index", str(half), "--index", str(idx), "-q")  # resumes once there is room
    assert p.returncode == 0 and "38 indexed" in p.stdout
    assert verify(idx).ok


def test_server_killed_during_an_index_job_resumes_cleanly(tiny_model, tmp_path):
    """SIGKILL the server while its job indexes a folder; a new server's job finishes it like one clean run."""
    import time
    import urllib.request

    from conftest import sample_photos

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_photos(5):
        shutil.copy(p, folder / p.name)
    clean = tmp_path / "clean"
    assert cli("index", str(folder), "--index", str(clean), "--model", str(tiny_model), "-q").returncode == 0
    idx = tmp_path / "idx"
    token = "kill-test-token-0123456789abcdef"
    env = {**ENV, "DINOSEARCH_TOKEN": token}

    def serve(port: int) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", str(idx), "--port", str(port), "--model", str(tiny_model),
                              "--device", "cpu", "--workers", "1", "--commit-every", "16"], env=env, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return p
            except OSError:
                assert time.time() < deadline and p.poll() is None, "server did not start"
                time.sleep(0.2)

    def add(port: int) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/index/jobs", data=json.dumps({"folder": str(folder)}).encode(),
                                     headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
        return json.load(urllib.request.urlopen(req))["id"]

    def job(port: int, jid: int) -> dict:
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/index/jobs/{jid}"))

    port = free_port()
    server = serve(port)
    jid = add(port)
    while job(port, jid)["done"] < 40:  # well into the job, past its first commits (every 16 photos)
        time.sleep(0.05)
    server.send_signal(signal.SIGKILL)
    server.wait()
    # the committed part is whole; a kill that lands inside a commit leaves its seg-N(.tmp), which verify names
    # (and --repair or the next writer removes), and nothing else
    r = verify(idx)
    assert all(p.startswith("unfinished segment(s)") for p in r.problems), r.problems
    assert r.counts["photos_indexed"] == r.counts["global.faiss"] and 0 < len(catalog_rows(idx)) < len(catalog_rows(clean))
    port = free_port()
    server = serve(port)
    try:
        jid = add(port)
        deadline = time.time() + 300
        while (j := job(port, jid))["state"] not in ("done", "failed"):
            assert time.time() < deadline
            time.sleep(0.2)
        assert j["state"] == "done", j
    finally:
        server.terminate()
        server.wait(10)
    assert verify(idx).ok
    assert catalog_rows(idx) == catalog_rows(clean)
    assert_consistent(idx)


def test_a_file_deleted_between_scan_and_decode_is_recorded_then_forgotten(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    files = sorted(photos.rglob("*.jpg"))
    victim = files[-1]

    def delete_after_the_first(done: int, total: int) -> None:
        if done == 1 and victim.exists():
            victim.unlink()  # scanned already, decoded later (decoding is lazy and in order with workers=0)

    stats = index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False), on_progress=delete_after_the_first)
    assert stats.failures == [(str(victim), "file vanished before it could be read")]
    assert stats.indexed == len(files) - 1 and verify(idx).ok
    stats = index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    assert stats.deleted == 1 and stats.indexed == 0
    assert len(catalog_rows(idx)) == len(files) - 1
