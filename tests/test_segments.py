"""The segmented store through the real Writer, FAISS and SQLite, on synthetic vectors: a commit writes only
what changed, deletes are tombstones masked at search time, readers keep their commit, a kill before the
catalog's commit leaves nothing half-done, and a format-1 index is converted in place."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import faiss
import numpy as np
import pytest

from indexer.catalog import SCHEMA
from indexer.compact import compact
from indexer.errors import IndexFormatError
from indexer.faissio import index_ids
from indexer.manifest import Manifest
from indexer.snapshot import Snapshot
from indexer.verify import verify
from indexer.writer import Writer

D, G = 16, 4  # dims, patch grid


def manifest() -> Manifest:
    return Manifest(model="synthetic", model_type="dinov2", revision=None, dim=D, patch_size=14, num_registers=0,
                    resolution=G * 14, grid=G, mean=(0.0,) * 3, std=(1.0,) * 3, precision="fp32", fingerprint=[0.0] * D)


def vectors(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cls = rng.normal(size=(n, D)).astype(np.float32)
    patches = rng.normal(size=(n, G, G, D)).astype(np.float32)
    faiss.normalize_L2(cls)
    return cls, patches / np.linalg.norm(patches, axis=-1, keepdims=True)


def add(w: Writer, ids: list[int], seed: int) -> np.ndarray:
    cls, patches = vectors(seed, len(ids))
    w.add([(i, f"/photos/{i}.jpg", 1, 1, f"h{i}", 8, 8) for i in ids], cls, patches)
    return cls


def fill(idx, n: int, seed: int = 0) -> np.ndarray:
    with Writer(idx, manifest()) as w:
        cls = add(w, [w.allocate_id() for _ in range(n)], seed)
        w.commit()
    return cls


def top(idx, v: np.ndarray, k: int = 5) -> list[int]:
    snap = Snapshot.open(idx)
    _, ids = snap.global_index().search(v[None], k)
    return ids[0].tolist()


def test_a_commit_writes_only_its_new_segment_and_the_catalog_in_place(tmp_path):
    idx = tmp_path / "idx"
    fill(idx, 200)
    seg1 = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (idx / "seg-000001").iterdir()}
    with Writer(idx, None) as w:
        add(w, [w.allocate_id()], seed=1)
        w.commit()
    assert sorted(p.name for p in idx.glob("seg-*")) == ["seg-000001", "seg-000002"]
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (idx / "seg-000001").iterdir()} == seg1  # untouched
    new = sum(p.stat().st_size for p in (idx / "seg-000002").iterdir())
    assert new < sum(s for _, s in seg1.values()) / 50  # one photo's vectors, not the index again
    snap = Snapshot.open(idx)
    assert snap.manifest.gen == 2 and [s["seg"] for s in snap.manifest.segments] == [1, 2]
    assert snap.global_index().ntotal == 201 and snap.patch_index().ntotal == 201 * G * G
    assert sqlite3.connect(idx / "catalog.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert verify(idx).ok


def test_replaced_and_deleted_photos_are_tombstones_masked_at_search(tmp_path):
    idx = tmp_path / "idx"
    cls = fill(idx, 50)
    assert top(idx, cls[4])[0] == 5 and top(idx, cls[5])[0] == 6
    with Writer(idx, None) as w:
        new = add(w, [5], seed=7)  # photo 5 replaced: its old vectors in seg 1 become a tombstone
        w.delete([6])
        w.commit()
    snap = Snapshot.open(idx)
    g = snap.global_index()
    assert g.ntotal == 49 and 6 not in index_ids(g) and [len(p.dead) for p in g.parts] == [2, 0]
    dist, hit = g.search(cls[4][None], 1)
    assert not (hit[0][0] == 5 and dist[0][0] > 0.999)  # the old vector of photo 5 is never found
    assert top(idx, new[0])[0] == 5 and 6 not in top(idx, cls[5], k=49)
    np.testing.assert_allclose(g.reconstruct(5), new[0], atol=1e-6)  # from the segment that holds it now
    assert snap.patch_index().reconstruct_batch(np.arange(5 * G * G, 6 * G * G)).shape == (G * G, D)
    only = g.search(cls[4][None], 3, ids=np.array([1, 2, 5, 6]))[1][0].tolist()  # a filter: live ids only
    assert sorted(only) == [1, 2, 5]
    assert verify(idx).ok


def test_a_reader_keeps_its_commit_while_the_writer_moves_on(tmp_path):
    idx = tmp_path / "idx"
    fill(idx, 20)
    reader = Snapshot.open(idx)
    with Writer(idx, None) as w:
        w.delete([1, 2, 3])
        add(w, [w.allocate_id()], seed=3)
        w.commit()
    assert reader.catalog().execute("SELECT count(*) FROM photos").fetchone()[0] == 20  # its read transaction
    assert reader.global_index().ntotal == 20
    assert Snapshot.open(idx).global_index().ntotal == 18


def test_a_kill_before_the_catalog_commit_leaves_the_last_commit_whole(tmp_path):
    idx = tmp_path / "idx"
    fill(idx, 20)
    code = f"""
import os, sys
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from test_segments import Writer, add
w = Writer({str(idx)!r}, None)
add(w, [w.allocate_id() for _ in range(5)], seed=9)
w.delete([1])
w._write_segment(w._seal_kinds())  # the new segment is on disk, the catalog's transaction is not committed
os.kill(os.getpid(), 9)
"""
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.returncode == -9
    assert (idx / "seg-000002").is_dir()
    r = verify(idx)
    assert r.problems == ["unfinished segment(s) left by an interrupted commit: seg-000002 (--repair or the next run removes them)"]
    assert r.counts["photos_indexed"] == 20 and Snapshot.open(idx).global_index().ntotal == 20  # photo 1 still there
    with Writer(idx, None) as w:
        assert not (idx / "seg-000002").exists() and w.manifest.gen == 1 and w.manifest.next_id == 21
    assert verify(idx).ok


def test_compaction_while_a_writer_changes_photos_keeps_their_changes(tmp_path):
    """Compaction builds from an older commit; a photo deleted or replaced meanwhile stays so after the swap."""
    idx = tmp_path / "idx"
    cls = fill(idx, 30)
    with Writer(idx, None) as w:
        add(w, [w.allocate_id() for _ in range(5)], seed=1)
        w.commit()
    import indexer.compact as c

    real = c.Writer

    def meanwhile(root, manifest, **kw):  # a writer's commit lands between the build and the swap
        with real(root, None) as w:
            w.delete([2])
            add(w, [3], seed=5)
            w.commit()
        return real(root, manifest, **kw)

    c.Writer = meanwhile
    try:
        r = compact(idx)
    finally:
        c.Writer = real
    assert r.inputs == [1, 2] and r.seg == 4
    g = Snapshot.open(idx).global_index()
    assert g.ntotal == 34 and 2 not in index_ids(g) and top(idx, cls[1], k=34).count(2) == 0
    assert {p.seg for p in g.parts} == {3, 4} and Snapshot.open(idx).catalog().execute(
        "SELECT seg FROM vec WHERE photo_id=3").fetchone()[0] == 3
    assert verify(idx).ok


def test_an_index_of_the_old_snapshot_format_is_converted_in_place(tmp_path):
    idx = tmp_path / "idx"
    snap = idx / "snap-000003"
    snap.mkdir(parents=True)
    m = manifest()
    cls, patches = vectors(0, 10)
    ids = np.arange(1, 11)
    g = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    g.add_with_ids(cls, ids)
    p = faiss.IndexIDMap2(faiss.IndexFlatIP(D))
    p.add_with_ids(patches.reshape(-1, D), (ids[:, None] * G * G + np.arange(G * G)).ravel())
    faiss.write_index(g, str(snap / "global.faiss"))
    faiss.write_index(p, str(snap / "patches.faiss"))
    faiss.write_index(faiss.IndexIDMap2(faiss.IndexFlatIP(D)), str(snap / "objects.faiss"))
    db = sqlite3.connect(snap / "catalog.sqlite")
    db.executescript(SCHEMA)
    db.executemany("INSERT INTO photos (id, path, size, mtime_ns, hash, status, updated) VALUES (?,?,1,1,'h','indexed',0)",
                   [(int(i), os.fsencode(f"/p/{i}.jpg")) for i in ids])
    db.commit()
    db.close()
    old = json.loads(m.to_json())
    old.update(format_version=1, next_id=11, global_kind="Flat", patch_kind="Flat")
    del old["gen"], old["segments"]
    (snap / "manifest.json").write_text(json.dumps(old))
    (idx / "CURRENT").write_text("snap-000003\n")
    with pytest.raises(IndexFormatError, match=r"old snapshot format \(1\): run `dinosearch verify .* --repair`"):
        Snapshot.open(idx)
    r = verify(idx, repair=True)
    assert r.ok and any("converted" in x for x in r.repaired)
    assert not (idx / "CURRENT").exists() and not list(idx.glob("snap-*"))
    assert top(idx, cls[6])[0] == 7 and Snapshot.open(idx).global_index().ntotal == 10
    with Writer(idx, None) as w:  # and it goes on as a segmented index
        add(w, [w.allocate_id()], seed=2)
        w.commit()
    assert [s["seg"] for s in Snapshot.open(idx).manifest.segments] == [1, 2] and verify(idx).ok


def test_serve_compacts_in_the_background_and_keeps_answering(photos, embedder, tmp_path):
    import time

    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings
    from indexer.runner import IndexConfig, index_folder

    idx = tmp_path / "idx"
    files = sorted(photos.rglob("*.jpg"))
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in files[24:]:
        f.rename(hidden / f.name)
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    for f in hidden.iterdir():
        f.rename(photos / f.name)
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))  # a second segment
    assert len(Snapshot.open(idx).manifest.segments) == 2
    with local_client(create_app(Settings(index=idx, device="cpu", compact_every=0.2))) as client:
        before = client.get("/photos/5/similar", params={"k": 5})
        deadline = time.monotonic() + 120
        while len(Snapshot.open(idx).manifest.segments) != 1:
            assert time.monotonic() < deadline, "no background compaction"
            time.sleep(0.2)
        assert client.get("/stats").json()["snapshot"] == "gen-000003"  # the server follows the live commit
        after = client.get("/photos/5/similar", params={"k": 5})
        assert before.status_code == after.status_code == 200 and after.json() == before.json()
    assert verify(idx).ok


def _anon_huge_kb(addr: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds ``addr`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


HUGE_CHILD = """
import ctypes, json, sys
assert ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE: this process gets no huge pages
from search import Engine, EngineConfig, Example, SearchQuery
e = Engine(sys.argv[1], EngineConfig(resident=True))
print(json.dumps({"huge": [p.huge for p in e.global_index.parts],
                  "hits": [[h.photo_id for h in e.search(SearchQuery((Example(q),), k=5)).hits] for q in (1, 7, 2999)]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages through madvise are Linux's")
def test_a_servers_global_vectors_sit_on_huge_pages_and_a_refresh_keeps_the_unchanged_segments(tmp_path):
    """EngineConfig(resident=True), what serve uses, reads global segments whole and asks the kernel for huge pages:
    here (Linux >= 6.1, THP "madvise") it says yes and smaps shows the vectors on huge pages; in a process with THP
    disabled (prctl PR_SET_THP_DISABLE) the kernel says no, for real, and the answers are the same. A refresh keeps
    the segments the new commit still names (the same objects, not read or checked again) and loads the new one."""
    from search import Engine, EngineConfig, Example, Filters, SearchQuery

    d, n = 384, 3000  # 4.6 MB of float vectors: two whole huge pages at least
    m = Manifest(model="synthetic", model_type="dinov2", revision=None, dim=d, patch_size=14, num_registers=0,
                 resolution=14, grid=1, mean=(0.5,) * 3, std=(0.5,) * 3, precision="fp32", fingerprint=[0.0] * d)
    rng = np.random.default_rng(3)
    xb = rng.normal(size=(n + 10, d)).astype(np.float32)
    faiss.normalize_L2(xb)
    idx = tmp_path / "idx"
    with Writer(idx, m) as w:
        ids = [w.allocate_id() for _ in range(n)]
        w.add([(i, f"/p/{i}.jpg", 1, 1, f"h{i}", 14, 14) for i in ids], xb[:n], xb[:n].reshape(n, 1, 1, d))
        w.commit()

    def hits(e, q, f=Filters()):
        return [h.photo_id for h in e.search(SearchQuery((Example(q),), filters=f, k=5)).hits]

    mapped, resident = Engine(idx), Engine(idx, EngineConfig(resident=True))
    (part,) = resident.global_index.parts
    assert part.resident and part.huge == "huge", part.huge
    vectors = part.rows()[0]
    assert _anon_huge_kb(vectors.ctypes.data + vectors.nbytes // 2) >= 2048
    assert mapped.global_index.parts[0].huge is None and not mapped.global_index.parts[0].resident
    for q in (1, 7, 2999):
        assert hits(resident, q) == hits(mapped, q)
        assert hits(resident, q)[0] == q

    child = subprocess.run([sys.executable, "-c", HUGE_CHILD, str(idx)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["huge"][0].startswith("refused"), out
    assert out["hits"] == [hits(mapped, q) for q in (1, 7, 2999)]

    with Writer(idx, None) as w:
        new = [w.allocate_id() for _ in range(10)]
        w.add([(i, f"/p/{i}.jpg", 1, 1, f"h{i}", 14, 14) for i in new], xb[n:], xb[n:].reshape(10, 1, 1, d))
        w.delete([7])
        w.commit()
    assert resident.refresh() and mapped.refresh()
    kept, fresh = resident.global_index.parts
    assert kept.index is part.index and kept.huge == "huge" and kept.dead.tolist() == [7]  # taken over, tombstone new
    assert fresh.seg != part.seg and fresh.resident
    for q in (1, new[0], new[-1]):
        assert hits(resident, q) == hits(mapped, q) == hits(Engine(idx), q)
        assert 7 not in hits(resident, q)


def test_huge_pages_answer_for_every_branch_without_raising(monkeypatch):
    """The branches a user's system selects that this machine cannot be: huge pages turned off by the user, and an
    OS without madvise (macOS, Windows). Each answers in words and leaves the array as it was."""
    from indexer import hugepages

    a = np.arange(3 << 20, dtype=np.float32)  # 12 MB: whole huge pages inside
    monkeypatch.setenv("DINOSEARCH_HUGE_PAGES", "0")
    assert hugepages.on_huge_pages(a) == "refused: DINOSEARCH_HUGE_PAGES=0"
    monkeypatch.delenv("DINOSEARCH_HUGE_PAGES")
    assert hugepages.on_huge_pages(a[:10]) == "small"
    monkeypatch.setattr(sys, "platform", "darwin")
    hugepages._madvise.cache_clear()
    try:
        assert hugepages.on_huge_pages(a) == "unsupported"
    finally:
        monkeypatch.undo()
        hugepages._madvise.cache_clear()
    assert a[-1] == (3 << 20) - 1 and a[12345] == 12345
