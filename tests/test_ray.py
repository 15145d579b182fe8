"""Ray on a real local cluster: ids after a kill, ghost vectors in the store, cluster addresses. One Ray
session (started by the module's fixture) serves every test that needs a cluster: Ray starts slowly on 2 cores."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import need
from test_cli import ENV, run
from test_index import catalog_rows

from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import Snapshot, live_generation
from indexer.vectors import open_store
from indexer.verify import verify


def _other_ray_running() -> bool:
    from ray._private.services import find_gcs_addresses

    return bool(find_gcs_addresses())


def test_ray_auto_without_a_cluster_is_one_line(photos, tiny_model, tmp_path):
    if _other_ray_running():
        pytest.skip("a Ray cluster is running on this machine, so --ray auto would find it")
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp")}
    p = subprocess.run([sys.executable, "-m", "api.cli", "index", str(photos), "--index", str(tmp_path / "idx"),
                        "--model", str(tiny_model), "-q", "--ray", "auto"], capture_output=True, text=True, env=env, timeout=300)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("dinosearch: error: --ray auto: no running Ray cluster") and "ray start --head" in lines[0]
    assert "--ray local" in lines[0]


@pytest.fixture(scope="module")
def cluster():
    """A local cluster started the way `--ray local` starts one, beside a stale cluster file (a cluster of this
    machine that died) that ray.init without address="local" would try to join. Yields its address."""
    import ray

    from indexer.distributed import _ray_init

    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    (Path(tmp) / "ray").mkdir()
    (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # nothing listens there
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("RAY_AUTH_MODE", "disabled")  # the kill test's driver, another process, joins without the token
        mp.delenv("RAY_ADDRESS", raising=False)
        _ray_init("local", 2)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def test_killed_ray_run_resumed_equals_a_clean_run_with_milvus(photos, embedder, tiny_model, tmp_path, cluster):
    """SIGKILL a `--ray` run after its first commit, resume it: the ids, catalog and results of a clean run,
    and no vectors left in Milvus for photos the catalog does not have."""
    need("milvus_lite", "the lite extra (Milvus Lite)")
    from indexer.distributed import index_folder_ray
    from search import Engine

    (photos / "broken.jpg").write_bytes(b"not a photo")
    clean = tmp_path / "clean"
    index_folder(photos, clean, embedder, IndexConfig(workers=0, progress=False))
    idx, uri = tmp_path / "idx", f"milvus-lite://{tmp_path / 'm.db'}?name=photos"
    args = [sys.executable, "-m", "api.cli", "index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q",
            "--ray", cluster, "--num-workers", "1", "--batch-size", "4", "--commit-every", "8", "--store", uri]
    proc = subprocess.Popen(args, env=ENV | {k: os.environ[k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE")}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while live_generation(idx) is None and proc.poll() is None:
        assert time.time() < deadline, "no commit in 300 s"
        time.sleep(0.05)
    time.sleep(0.2)  # into the next commit's photos: embedded and sent to Milvus, not committed (workers run ahead)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(catalog_rows(idx))
    assert 0 < committed < 49
    stats = index_folder_ray(photos, idx, embedder, IndexConfig(batch_size=4, commit_every=8, progress=False),
                             num_workers=1, store=uri)
    assert stats.indexed + stats.failed == 49 - committed
    assert catalog_rows(idx) == catalog_rows(clean)  # the same ids: 1..49 in scan order, not 49 + what was redone
    report = verify(idx)
    assert report.ok, report.problems
    store = open_store(uri, embedder.dim)
    indexed = [r[0] for r in catalog_rows(idx) if r[2] == "indexed"]
    assert store.photo_ids("global").tolist() == indexed and store.photo_ids("patches").tolist() == indexed
    e, c = Engine(idx, embedder=embedder), Engine(clean, embedder=embedder)
    for q in sorted(photos.rglob("*.jpg"))[:48:12]:
        a, b = e.similar(q, 10), c.similar(q, 10)
        assert [h.photo_id for h in a] == [h.photo_id for h in b] and all(h.path for h in a)


def test_ray_workers_write_the_segments_and_the_driver_only_commits(photos, embedder, tmp_path, cluster, monkeypatch):
    """The embedding actors write the segment files (their pid is in the manifest's segment records, never the
    driver's); the driver's Writer never adds a vector nor receives one; the catalog, ids and top-10 equal a
    local run's; nothing staged is left behind."""
    from indexer.distributed import index_folder_ray
    from indexer.writer import Writer
    from search import Engine

    (photos / "broken.jpg").write_bytes(b"not a photo")
    clean = tmp_path / "clean"
    index_folder(photos, clean, embedder, IndexConfig(workers=0, progress=False))

    def refuse(*a, **k):
        raise AssertionError("the driver's Writer.add was called: vectors went through the driver")

    adopted = []
    adopt = Writer.adopt

    def spy(self, rows, staged, vectors=None):
        adopted.append((len(rows), staged["pid"], vectors))
        return adopt(self, rows, staged, vectors)

    monkeypatch.setattr(Writer, "add", refuse)
    monkeypatch.setattr(Writer, "adopt", spy)
    idx = tmp_path / "idx"
    stats = index_folder_ray(photos, idx, embedder, IndexConfig(batch_size=4, commit_every=16, progress=False), num_workers=1)
    assert stats.indexed == 48 and stats.failed == 1 and stats.commits >= 3
    assert sum(n for n, _, _ in adopted) == 48 and all(v is None for _, _, v in adopted)  # no vector reached the driver
    assert catalog_rows(idx) == catalog_rows(clean)
    segs = Snapshot.open(idx).manifest.segments
    assert segs and all(s["pid"] not in (None, os.getpid()) for s in segs), segs
    assert {s["pid"] for s in segs} == {pid for _, pid, _ in adopted}
    assert all(set(s["kinds"]) == {"global", "patches"} for s in segs)
    assert not list(idx.glob("seg-stage-*")) and not list(idx.glob("*.tmp"))
    report = verify(idx)
    assert report.ok, report.problems
    e, c = Engine(idx, embedder=embedder), Engine(clean, embedder=embedder)
    for q in sorted(photos.rglob("*.jpg"))[:48:8]:
        a, b = e.similar(q, 10), c.similar(q, 10)
        assert [h.photo_id for h in a] == [h.photo_id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)


def test_staged_segments_of_a_killed_writer_are_removed_by_the_next(photos, embedder, tmp_path):
    """A segment staged for a writer that died is never named: verify reports it, the next writer removes it,
    and a live writer's own staged segments survive its commits until it adopts them."""
    from indexer.writer import Writer, write_staged_segment

    for p in sorted(photos.rglob("*.jpg"))[4:]:
        p.unlink()
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    m = Snapshot.open(idx).manifest
    rng = np.random.default_rng(0)
    cls, patches = rng.normal(size=(2, m.dim)).astype(np.float32), rng.normal(size=(2, m.grid, m.grid, m.dim)).astype(np.float32)
    dead = write_staged_segment(idx, "seg-stage-1-dead-", np.array([10, 11]), cls, patches)  # its writer was killed
    report = verify(idx)
    assert not report.ok and dead["name"] in " ".join(report.problems)
    w = Writer(idx, None)
    assert not (idx / dead["name"]).exists()
    mine = write_staged_segment(idx, w.staging_prefix, np.array([10, 11]), cls, patches)
    w.set_not_images("/nowhere", {".txt": 1})
    w.commit()  # a commit of this writer keeps what is staged for it
    assert (idx / mine["name"]).is_dir()
    w.close()  # never adopted: gone with its writer
    assert not (idx / mine["name"]).exists() and verify(idx).ok


@pytest.mark.parametrize("kind", ["faiss", "milvus-lite"])
def test_verify_finds_and_repair_removes_store_vectors_without_a_catalog_row(photos, embedder, tmp_path, kind):
    if kind == "milvus-lite":
        need("milvus_lite", "the lite extra (Milvus Lite)")
    uri = f"faiss://{tmp_path / 'vec'}" if kind == "faiss" else f"milvus-lite://{tmp_path / 'm.db'}?name=photos"
    for p in sorted(photos.rglob("*.jpg"))[8:]:
        p.unlink()
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False), store=uri)
    assert verify(idx).ok
    grid2 = Snapshot.open(idx).manifest.grid ** 2
    rng = np.random.default_rng(0)
    store = open_store(uri, embedder.dim)
    photo = 40  # as a killed run leaves them: vectors sent for a photo whose catalog row was never committed
    store.add("global", np.array([photo]), np.array([photo]), rng.normal(size=(1, embedder.dim)))
    store.add("patches", photo * grid2 + np.arange(grid2), np.full(grid2, photo), rng.normal(size=(grid2, embedder.dim)))
    store.remove_photos([3], kinds=("global",))
    store.flush()
    report = verify(idx)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "holds global vectors of 1 photos" in text and "holds patches vectors of 1 photos" in text
    assert "no global vectors for 1 indexed photos, e.g. [3]" in text and "--repair removes them" in text
    report = verify(idx, repair=True)
    assert report.snapshot == Snapshot.open(idx).name  # the store's faults never switch the snapshot back
    assert any("removed the patches vectors of 1 photos" in r for r in report.repaired)
    assert open_store(uri, embedder.dim).photo_ids("patches").tolist() == list(range(1, 9))
    # the next indexing run removes what lies at or above the committed next_id (never committed by anyone)
    store = open_store(uri, embedder.dim)
    store.add("global", np.array([40]), np.array([40]), rng.normal(size=(1, embedder.dim)))
    store.flush()
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    assert 40 not in open_store(uri, embedder.dim).photo_ids("global").tolist()


def test_cli_verify_names_store_ghosts(photos, tiny_model, tmp_path):
    for p in sorted(photos.rglob("*.jpg"))[4:]:
        p.unlink()
    idx, uri = tmp_path / "idx", f"faiss://{tmp_path / 'vec'}"
    run("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q", "--store", uri)
    store = open_store(uri, Snapshot.open(idx).manifest.dim)
    store.add("global", np.array([7]), np.array([7]), np.ones((1, store.dim), np.float32))
    store.flush()
    p = run("verify", str(idx), check=False)
    assert p.returncode != 0 and "holds global vectors of 1 photos the catalog does not have" in p.stdout + p.stderr
    run("verify", str(idx), "--repair")
    run("verify", str(idx))
