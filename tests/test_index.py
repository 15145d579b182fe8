"""Indexing a real photo folder end to end, re-runs, bad files, model mismatch, atomic commits."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

from indexer.embedder import Embedder, EmbedderConfig
from indexer.errors import IndexBusy, ModelMismatch
from indexer.faissio import index_ids
from indexer.reader import load_query
from indexer.runner import IndexConfig, index_folder
from indexer.snapshot import Snapshot, live_generation
from indexer.testing import save_random_model
from indexer.verify import verify
from indexer.writer import Writer
from search import Engine

CFG = IndexConfig(batch_size=8, workers=1, progress=False)


def catalog_rows(idx) -> list[tuple]:
    db = Snapshot.open(idx).catalog()
    return db.execute("SELECT id, path, status, hash, width, height FROM photos ORDER BY id").fetchall()


def assert_consistent(idx) -> None:
    """Every indexed photo has exactly one global vector and grid*grid patch vectors, nothing else."""
    snap = Snapshot.open(idx)
    db = snap.catalog()
    indexed = sorted(i for (i,) in db.execute("SELECT id FROM photos WHERE status='indexed'"))
    g, p = snap.global_index(), snap.patch_index()
    gids = index_ids(g)  # the live ones: a segment's tombstoned vectors are not counted
    assert gids.tolist() == indexed
    pids = index_ids(p)
    grid2 = snap.manifest.grid**2
    assert len(pids) == len(set(pids.tolist())) == grid2 * len(indexed)
    assert sorted(set((pids // grid2).tolist())) == indexed


def test_index_then_find_a_reencoded_copy_at_rank_1(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    stats = index_folder(photos, idx, embedder, CFG)
    assert (stats.indexed, stats.failed, stats.new) == (48, 0, 48)
    assert_consistent(idx)
    engine = Engine(idx, embedder=embedder)
    for src in sorted(photos.rglob("*.jpg"))[::7]:
        img = Image.open(src).convert("RGB")
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70)
        hits = engine.similar(buf.getvalue(), k=5)
        assert hits[0].path == str(src), (src, hits[:2])
        assert hits[0].score > 0.95 and hits[0].score >= hits[1].score


def test_faiss_results_equal_brute_force(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    engine = Engine(idx, embedder=embedder)
    files = sorted(photos.rglob("*.jpg"))
    xb = np.concatenate([embedder.embed(load_query(f, 224)[0][None]).cls for f in files])
    path_of = {str(f): i for i, f in enumerate(files)}
    for qi in (0, 11, 30):
        scores = xb @ xb[qi]
        expect = np.argsort(-scores, kind="stable")[:10]
        hits = engine.similar(str(files[qi]), k=10)
        assert [path_of[h.path] for h in hits] == expect.tolist()
        assert np.allclose([h.score for h in hits], scores[expect], atol=1e-4)
    # patch index (SQ8 by default): the patch it finds is, by exact score, as good as brute force's best
    snap = Snapshot.open(idx)
    cat = {os.fsdecode(p): i for i, p in snap.catalog().execute("SELECT id, path FROM photos")}
    pb = {}
    for f in files:
        pb[cat[str(f)]] = embedder.embed(load_query(f, 224)[0][None]).patches[0].reshape(256, 32)
    ids = np.array(sorted(pb))
    xpb = np.concatenate([pb[i] for i in ids])
    xq = pb[cat[str(files[5])]][::13] * 0.9 + pb[cat[str(files[9])]][::13] * 0.1  # patches near, not in, the index
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    D, I = snap.patch_index().search(np.ascontiguousarray(xq), 1)
    exact = xpb @ xq.T
    found = np.array([exact[np.searchsorted(ids, i // 256) * 256 + i % 256, j] for j, i in enumerate(I[:, 0])])
    assert np.all(found >= exact.max(0) - 0.01)
    assert np.abs(D[:, 0] - found).max() < 0.02


def test_k_larger_than_collection_and_empty_filter(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    engine = Engine(idx, embedder=embedder)
    assert len(engine.similar(1, k=500)) == 48
    assert engine.similar(1, k=0) == []
    assert [h.photo_id for h in engine.similar(1, k=5, allowed={3, 7})] in ([3, 7], [7, 3])


def test_rerun_adds_changes_touches_and_deletes(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    before = {r[1]: r for r in catalog_rows(idx)}
    files = sorted(photos.rglob("*.jpg"))
    deleted, changed, touched = files[0], files[1], files[2]
    deleted.unlink()
    Image.open(files[3]).save(changed)  # other content, same name
    os.utime(touched, ns=(1, 1_000_000_000))  # same content, new mtime
    added = photos / "new" / "added.png"
    added.parent.mkdir()
    Image.open(files[4]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(added)
    stats = index_folder(photos, idx, embedder, CFG)
    assert (stats.deleted, stats.changed, stats.new, stats.touched, stats.indexed, stats.unchanged) == (1, 2, 1, 1, 2, 45)
    after = {r[1]: r for r in catalog_rows(idx)}
    assert os.fsencode(str(deleted)) not in after
    assert after[os.fsencode(str(changed))][0] == before[os.fsencode(str(changed))][0]  # same id, new vectors
    assert after[os.fsencode(str(changed))][3] != before[os.fsencode(str(changed))][3]
    assert after[os.fsencode(str(added))][0] == 49
    assert_consistent(idx)
    engine = Engine(idx, embedder=embedder)
    assert engine.similar(str(files[3]), k=2)[1].path in (str(changed), str(files[3]))
    assert index_folder(photos, idx, embedder, CFG).indexed == 0  # nothing left to do
    assert sorted(p.name for p in idx.glob("seg-*")) == ["seg-000001", "seg-000002"]  # a commit wrote only what changed


def test_bad_files_are_recorded_and_the_run_goes_on(photos, embedder, tmp_path):
    (photos / "zero.jpg").write_bytes(b"")
    (photos / "text.jpg").write_text("not a photo")
    good = (photos / "sub").glob("*.jpg").__next__().read_bytes()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (photos / "broken-link.jpg").symlink_to(photos / "does-not-exist.jpg")
    (photos / "denied.jpg").write_bytes(good)
    os.chmod(photos / "denied.jpg", 0)
    idx = tmp_path / "idx"
    stats = index_folder(photos, idx, embedder, CFG)
    reasons = dict((os.path.basename(p), r) for p, r in stats.failures)
    assert "empty file" in reasons["zero.jpg"] and "not an image" in reasons["text.jpg"]
    assert "broken link" in reasons["broken-link.jpg"]
    assert stats.indexed >= 48
    if os.geteuid() != 0:  # root reads anything
        assert reasons["denied.jpg"] == "permission denied"
    failed = {os.path.basename(os.fsdecode(p)): e for p, e in Snapshot.open(idx).catalog().execute("SELECT path, error FROM photos WHERE status='failed'")}
    assert {"zero.jpg", "text.jpg", "broken-link.jpg"} <= set(failed)
    assert_consistent(idx)
    # failures are not retried unless asked, and are retried when the file is fixed
    assert index_folder(photos, idx, embedder, CFG).failed == 0
    shutil.copy(photos / "denied.jpg", photos / "zero.jpg") if os.geteuid() == 0 else (photos / "zero.jpg").write_bytes(good)
    stats = index_folder(photos, idx, embedder, CFG)
    assert stats.changed == 1 and stats.indexed == 1
    assert_consistent(idx)


def test_model_mismatch_is_a_clear_error(photos, embedder, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    other = Embedder(EmbedderConfig(model=str(save_random_model(tmp_path / "other", "tiny", seed=1)), device="cpu"))
    with pytest.raises(ModelMismatch, match="embeds differently"):
        Engine(idx, embedder=other)
    with pytest.raises(ModelMismatch, match="embeds differently"):
        index_folder(photos, idx, other, CFG)
    low = Embedder(EmbedderConfig(model=str(tiny_model), resolution=112, device="cpu"))
    with pytest.raises(ModelMismatch, match="224px.*112px"):
        Engine(idx, embedder=low)


def test_one_writer_at_a_time_and_readers_keep_their_snapshot(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    reader = Engine(idx, embedder=embedder)
    n = len(reader)
    from indexer.manifest import Manifest

    with Writer(idx, Manifest.for_embedder(embedder)) as w:
        with pytest.raises(IndexBusy):
            Writer(idx, Manifest.for_embedder(embedder))
        w.delete([1, 2, 3])
        w.commit()
        assert len(reader) == n and len(reader.similar(5, k=100)) == n  # old snapshot still whole
        assert reader.refresh() and len(reader) == n - 3


def test_forced_ivf_kind_with_exact_rerank(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(batch_size=48, workers=0, progress=False, global_kind="IVF4,Flat", patch_kind="IVF4,PQ4"))
    engine = Engine(idx, embedder=embedder)
    assert engine.manifest.global_kind == "IVF4,Flat" and engine.manifest.patch_kind == "IVF4,PQ4"
    hits = engine.similar(10, k=48)
    assert len(hits) == 48 and hits[0].photo_id == 10
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # delete works on IVF kinds too
    (sorted(photos.rglob("*.jpg"))[0]).unlink()
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    assert len(Engine(idx, embedder=embedder)) == 47


def test_catalog_is_plain_sqlite(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    snap = Snapshot.open(idx)
    db = sqlite3.connect(snap.path / "catalog.sqlite")
    (n, w) = db.execute("SELECT count(*), min(width) FROM photos WHERE status='indexed'").fetchone()
    assert n == 48 and w > 0


def test_compaction_merges_segments_and_kinds_follow_the_collection_size(photos, embedder, tmp_path, monkeypatch):
    """Every run commits one small exact segment; compaction merges them into one sealed segment per kind, its kind
    (and IVF list count) chosen by the merged size, leaving tombstoned vectors behind; answers stay the same."""
    import indexer.faissio as faissio
    from indexer.compact import compact

    monkeypatch.setattr(faissio, "PATCH_SQ8_MAX", 16 * 256)
    monkeypatch.setattr(faissio, "PATCH_IVF_SQ8_MAX", 32 * 256)
    monkeypatch.setattr(faissio, "GLOBAL_FLAT_MAX", 30)
    idx = tmp_path / "idx"
    files = sorted(photos.rglob("*.jpg"))
    first = files[0]
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in files[12:]:
        f.rename(hidden / f.name)
    index_folder(photos, idx, embedder, CFG)  # 12 photos
    assert Snapshot.open(idx).manifest.patch_kind == "SQ8"
    assert compact(idx).seg is None  # one clean segment: nothing to merge
    for f in list(hidden.iterdir())[:12]:
        f.rename(photos / f.name)
    index_folder(photos, idx, embedder, CFG)  # 24 photos, two segments
    r = compact(idx)
    assert r.inputs == [1, 2] and r.kinds["patches"].endswith(",SQ8") and r.kinds["global"] == "Flat"
    assert Snapshot.open(idx).manifest.patch_kind.endswith(",SQ8") and sorted(p.name for p in idx.glob("seg-*")) == [
        "seg-000001", "seg-000002", "seg-000003"]  # the inputs stay one commit, for readers that opened it
    assert_consistent_ivf(idx, 24)
    for f in hidden.iterdir():
        f.rename(photos / f.name)
    files = sorted(photos.rglob("*.jpg"))
    first.unlink()  # a tombstone in the sealed segment
    index_folder(photos, idx, embedder, CFG)  # 47 photos
    before = Engine(idx, embedder=embedder).similar(str(files[20]), k=10)
    r = compact(idx)
    assert r.dropped["global"] == 1 and r.vectors["global"] == 47
    m = Snapshot.open(idx).manifest
    assert [s["seg"] for s in m.segments] == [r.seg]
    assert m.patch_kind.startswith("IVF") and m.patch_kind.endswith(",PQ4") and m.global_kind.startswith("HNSW")
    assert_consistent_ivf(idx, 47)
    assert verify(idx).ok
    engine = Engine(idx, embedder=embedder)
    q = files[20]
    after = engine.similar(str(q), k=10)
    assert after[0].path == str(q) and [h.photo_id for h in after[:5]] == [h.photo_id for h in before[:5]]
    w, h = Image.open(q).size
    hits = engine.region(str(q), k=3, box=(w / 4, h / 4, 3 * w / 4, 3 * h / 4))  # PQ4 codes (d=32): 4 bytes a patch
    assert str(q) in [hit.path for hit in hits]


def assert_consistent_ivf(idx, n: int) -> None:
    from indexer.faissio import index_ids

    snap = Snapshot.open(idx)
    g, p = index_ids(snap.global_index()), index_ids(snap.patch_index())  # live ids over all segments
    assert len(g) == len(set(g.tolist())) == n
    assert len(p) == len(set(p.tolist())) == n * 256 and set((p // 256).tolist()) == set(g.tolist())


def test_an_untrainable_forced_kind_is_a_clear_error_and_loses_nothing(photos, embedder, tmp_path):
    from indexer.errors import ConfigError

    idx = tmp_path / "idx"
    with pytest.raises(ConfigError, match="cannot train index kind 'IVF4096,Flat' on 48 vectors"):
        index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False, global_kind="IVF4096,Flat"))
    assert live_generation(idx) is None and not list(idx.glob("seg-*"))


def test_moved_and_renamed_photos_keep_their_ids_and_vectors(photos, embedder, tmp_path):
    """A photo moved or renamed inside the indexed folder (its bytes gone from one path, found at another in the same
    scan) keeps its id, vectors, tags and metadata: the row follows it, nothing is embedded. A copy is a new photo."""
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    before = {os.fsdecode(r[1]): r for r in catalog_rows(idx)}
    files = sorted(photos.glob("*.jpg"))
    (photos / "trip" / "day1").mkdir(parents=True)
    moves = {files[0]: photos / "trip" / "day1" / files[0].name,  # moved to another (new) subfolder
             files[1]: photos / "trip" / "renamed.jpg",  # moved and renamed
             files[2]: photos / "sub" / "renamed-here.jpg"}  # renamed into an existing subfolder
    for a, b in moves.items():
        os.rename(a, b)
    copy = photos / "trip" / "copy.jpg"
    shutil.copy2(files[3], copy)  # the old path stays: a copy is a new photo
    stats = index_folder(photos, idx, embedder, CFG)
    assert (stats.moved, stats.indexed, stats.new, stats.deleted, stats.unchanged) == (3, 1, 1, 0, 45)
    after = {os.fsdecode(r[1]): r for r in catalog_rows(idx)}
    assert len(after) == 49 and after[str(copy)][0] == 49
    for a, b in moves.items():
        assert str(a) not in after and after[str(b)][0] == before[str(a)][0] and after[str(b)][2:] == before[str(a)][2:]
    assert_consistent(idx)
    db = Snapshot.open(idx).catalog()
    folders = dict(db.execute("SELECT photo_id, folder FROM meta").fetchall())
    for b in moves.values():
        assert os.fsdecode(folders[after[str(b)][0]]) == str(b.parent)
    engine = Engine(idx, embedder=embedder)
    for b in moves.values():
        hit = engine.similar(str(b), k=1)[0]
        assert (hit.photo_id, hit.path) == (after[str(b)][0], str(b)) and hit.score > 0.999
    # moved back and duplicated in one scan: each old row is matched once, the second copy is new
    os.rename(moves[files[0]], files[0])
    shutil.copy2(files[0], photos / "trip" / "again.jpg")
    stats = index_folder(photos, idx, embedder, CFG)
    assert (stats.moved, stats.indexed) == (1, 1)
    assert {os.fsdecode(r[1]): r[0] for r in catalog_rows(idx)}[str(files[0])] == before[str(files[0])][0]


def test_the_run_logs_its_longest_pause_and_what_filled_it(photos, embedder, tmp_path, monkeypatch):
    """A commit that stalls (a slow disk, here one held for 0.6 s) is the run's longest pause, named as a commit;
    a run without a stall names what its longest gap went to."""
    stats = index_folder(photos, tmp_path / "a", embedder, IndexConfig(batch_size=8, workers=1, progress=False, commit_every=16))
    assert 0 < stats.longest_pause < stats.seconds and stats.pause_cause in ("commit", "embedding", "decoding", "other")
    real = Writer.commit

    def slow_commit(self):
        import time

        time.sleep(0.6)
        return real(self)

    monkeypatch.setattr(Writer, "commit", slow_commit)
    stats = index_folder(photos, tmp_path / "b", embedder, IndexConfig(batch_size=8, workers=1, progress=False, commit_every=16))
    assert stats.commits >= 3 and stats.longest_pause >= 0.6 and stats.pause_cause == "commit", stats
