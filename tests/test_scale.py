"""Scale: build-index (train, shards in parallel, merge on disk, memory-mapped search) and Ray indexing."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest
from conftest import sample_photos
from test_cli import run
from test_index import catalog_rows

from indexer.build import build_sharded, parse_memory, plan_kind
from indexer.errors import ConfigError
from indexer.faissio import make_index, on_disk_lists
from indexer.snapshot import Snapshot
from indexer.verify import verify


def test_plan_kind_follows_count_and_memory():
    gib = 2**30
    assert plan_kind(10_000, 384, gib) == "Flat"
    assert plan_kind(2_000_000, 384, 8 * gib).startswith("IVF") and plan_kind(2_000_000, 384, 8 * gib).endswith(",Flat")
    pq = plan_kind(100_000_000, 384, 16 * gib)
    assert pq.startswith(("IVF32768,PQ", "IVF65536,PQ")) and 100_000_000 * (int(pq.split("PQ")[1]) + 8) <= 16 * gib
    with pytest.raises(ConfigError, match="raise --memory"):
        plan_kind(10**9, 384, gib)
    assert parse_memory("8GB") == 8 * gib and parse_memory("512MiB") == 512 * 2**20 and parse_memory("2e9") == 2 * 10**9
    with pytest.raises(ConfigError):
        parse_memory("lots")


@pytest.mark.parametrize("kind", ["IVF64,Flat", "IVF64,PQ16x4"])
def test_shards_merged_on_disk_equal_one_piece(tmp_path, kind):
    rng = np.random.default_rng(0)
    d, n = 64, 8_000
    centers = rng.normal(size=(100, d)).astype(np.float32)
    xb = centers[rng.integers(0, 100, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    faiss.normalize_L2(xb)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # ids not in 0..n: as photo/patch ids are
    src = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    src.add_with_ids(xb, ids)
    out = tmp_path / "snap"
    out.mkdir()
    merged, shard_s = build_sharded(src, kind, d, out, "global", shards=4, workers=2, sample=n)
    assert len(shard_s) == 4 and (out / "global.ivfdata").is_file() and on_disk_lists(merged) is not None
    # one piece: the same trained index (same sample, same seed), everything added at once
    one = make_index(kind, d, src.reconstruct_batch(np.sort(ids)))
    one.add_with_ids(src.reconstruct_batch(np.sort(ids)), np.sort(ids))
    xq = xb[rng.choice(n, 50, replace=False)] + 0.05 * rng.normal(size=(50, d)).astype(np.float32)
    for index in (merged, one):
        faiss.extract_index_ivf(index).nprobe = 8
    D1, I1 = merged.search(xq, 10)
    D2, I2 = one.search(xq, 10)
    assert merged.ntotal == one.ntotal == n
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-5)
    assert (I1 == I2).mean() > 0.99  # equal but for exact ties in distance
    # written, then read back memory-mapped from where the index file lies (even after a move)
    faiss.write_index(merged, str(out / "global.faiss"))
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    back = faiss.read_index(str(moved / "global.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    faiss.extract_index_ivf(back).nprobe = 8
    D3, I3 = back.search(xq, 10)
    assert np.array_equal(I3, I1)


def test_build_index_command_keeps_results_and_later_runs_still_work(photos, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    run("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q")
    query = str(sorted(photos.rglob("*.jpg"))[7])
    before = json.loads(run("search", str(idx), query, "-k", "5", "--json").stdout)
    region_before = json.loads(run("search", str(idx), query, "--box", "20,20,200,150", "-k", "5", "--json").stdout)
    out = run("build-index", str(idx), "--kind", "IVF16,Flat", "--patch-kind", "IVF64,SQ8", "--shards", "3").stdout
    assert "global: 48 vectors -> IVF16,Flat" in out and "patches: 12288 vectors -> IVF64,SQ8" in out and "merged on disk" in out
    seg = idx / "seg-000002"  # everything compacted into one sealed segment
    assert [s["seg"] for s in Snapshot.open(idx).manifest.segments] == [2]
    assert (seg / "global.ivfdata").is_file() and (seg / "patches.ivfdata").is_file()
    assert on_disk_lists(Snapshot.open(idx).global_index().parts[0].index) is not None
    assert verify(idx).ok
    after = json.loads(run("search", str(idx), query, "-k", "5", "--json", "--nprobe", "16").stdout)
    assert [h["id"] for h in after] == [h["id"] for h in before]
    region_after = json.loads(run("search", str(idx), query, "--box", "20,20,200,150", "-k", "5", "--json", "--nprobe", "64").stdout)
    assert [h["id"] for h in region_after][:3] == [h["id"] for h in region_before][:3]
    # an incremental run afterwards: a new small segment beside it, the built segment's files untouched
    built = (seg / "global.ivfdata").read_bytes()
    extra = photos / "new.jpg"
    shutil.copy(sample_photos(3)[-1], extra)
    assert "1 indexed" in run("index", str(photos), "--index", str(idx), "-q").stdout
    assert (seg / "global.ivfdata").read_bytes() == built
    assert verify(idx).ok and json.loads(run("info", str(idx), "--json").stdout)["global_vectors"] == 49
    # the index directory can move
    moved = tmp_path / "moved"
    shutil.move(idx, moved)
    run("build-index", str(moved), "--kind", "IVF16,Flat", "--patch-kind", "IVF64,SQ8")
    shutil.move(moved, tmp_path / "again")
    assert json.loads(run("search", str(tmp_path / "again"), query, "-k", "1", "--json").stdout)[0]["path"] == query


def test_ray_local_cluster_gives_the_single_process_catalog_and_results(photos, tiny_model, tmp_path):
    (photos / "broken.jpg").write_bytes(b"not a photo")
    one = tmp_path / "one"
    run("index", str(photos), "--index", str(one), "--model", str(tiny_model), "-q")
    dist = tmp_path / "dist"
    out = run("index", str(photos), "--index", str(dist), "--model", str(tiny_model), "-q",
              "--ray", "local", "--num-workers", "2", "--ray-cpus", "2", "--batch-size", "8").stdout
    assert "48 indexed" in out and "1 failed" in out
    assert catalog_rows(dist) == catalog_rows(one)

    def meta(i):
        return Snapshot.open(i).catalog().execute("SELECT * FROM meta ORDER BY photo_id").fetchall()

    assert len(meta(dist)) == 48 and meta(dist) == meta(one)  # Ray runs read each new photo's header in the driver
    assert verify(dist).ok
    for q in [q for q in sorted(photos.rglob("*.jpg")) if q.name != "broken.jpg"][::9]:
        a = json.loads(run("search", str(dist), str(q), "-k", "10", "--json").stdout)
        b = json.loads(run("search", str(one), str(q), "-k", "10", "--json").stdout)
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-4)
    # a rerun skips what was committed; with --classify it only tags (in the actors), as one machine does
    from indexer.testing import save_random_classifier

    vit = save_random_classifier(tmp_path / "vit", ["cat", "dog", "boat", "tree", "lamp", "plane"])
    out = run("index", str(photos), "--index", str(dist), "-q", "--ray", "local", "--ray-cpus", "2",
              "--classify", "--classifier", str(vit)).stdout
    assert "0 indexed, 48 tagged" in out
    run("index", str(photos), "--index", str(one), "-q", "--classify", "--classifier", str(vit))

    def tags(i):
        return Snapshot.open(i).catalog().execute("SELECT photo_id, rank, label, round(prob, 4) FROM labels ORDER BY 1, 2").fetchall()

    assert len(tags(dist)) == 48 * 5 and tags(dist) == tags(one)
