"""Milvus Lite as the vector store: index kinds chosen by collection size (rebuilt at a flush, never per add), read
back from the collection, and checked (and rebuilt) by verify. Thresholds are lowered so a few hundred vectors
cross them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need

from indexer import vectors
from indexer.runner import IndexConfig, index_folder
from indexer.vectors import open_store
from indexer.verify import verify


@pytest.fixture(autouse=True)
def _lite():
    need("milvus_lite", "the lite extra (Milvus Lite)")


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kinds_follow_the_collection_size_at_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(vectors, "MILVUS_FLAT_MAX", {"global": 100, "objects": 100, "patches": 200})
    uri, d = f"milvus-lite://{tmp_path / 'm.db'}?name=t", 32
    store = open_store(uri, d)
    rng = np.random.default_rng(0)
    xb = _unit(rng, 400, d)
    store.add("global", np.arange(60), np.arange(60), xb[:60])
    store.flush()
    assert store.index_kind("global") == "FLAT" == store.wanted_kind("global")
    store.add("global", np.arange(60, 210), np.arange(60, 210), xb[60:210])
    assert store.index_kind("global") == "FLAT"  # never rebuilt per add
    store.add("patches", np.arange(400), np.arange(400) // 4, xb)
    store.flush()  # a commit's flush: both collections crossed their thresholds
    assert store.index_kind("global") == "HNSW_M32" and store.index_kind("patches") == "IVF_SQ8_nlist16"
    assert store.index_kind("objects") == "FLAT"
    D, I = store.search("global", xb[[5, 150]], 3)
    assert I[:, 0].tolist() == [5, 150] and np.allclose(D[:, 0], 1, atol=1e-4)
    _, I = store.search("patches", xb[[7]], 1)
    assert I[0, 0] == 7
    again = open_store(uri, d)  # the kind is read back from the collection by another process's client
    assert again.index_kind("global") == "HNSW_M32" and again.search("global", xb[[9]], 1)[1][0, 0] == 9


def test_an_index_with_milvus_gets_kinds_by_size_and_verify_rebuilds_a_wrong_one(photos, embedder, tmp_path, monkeypatch,
                                                                                  capsys):
    import json

    from api.cli import main
    from search import Engine

    monkeypatch.setattr(vectors, "MILVUS_FLAT_MAX", {"global": 20, "objects": 20, "patches": 2000})
    uri = f"milvus-lite://{tmp_path / 'm.db'}?name=photos"
    idx, plain = tmp_path / "idx", tmp_path / "plain"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False, commit_every=16), store=uri)
    index_folder(photos, plain, embedder, IndexConfig(workers=0, progress=False))
    store = open_store(uri, embedder.dim)
    assert store.index_kind("global") == "HNSW_M32" and store.index_kind("patches").startswith("IVF_SQ8_nlist")
    assert verify(idx).ok
    capsys.readouterr()
    assert main(["info", str(idx), "--json"]) == 0  # info reads each collection's kind from the store
    info = json.loads(capsys.readouterr().out)
    assert info["store"] == uri and info["store_kinds"]["global"] == "HNSW_M32" and info["store_kinds"]["objects"] == "FLAT"
    e, c = Engine(idx, embedder=embedder), Engine(plain, embedder=embedder)
    assert e.vectors is not None
    for q in sorted(photos.rglob("*.jpg"))[:48:12]:
        assert [h.photo_id for h in e.similar(q, 10)] == [h.photo_id for h in c.similar(q, 10)]
    monkeypatch.setattr(vectors, "MILVUS_FLAT_MAX", {"global": 1000, "objects": 1000, "patches": 100_000})
    report = verify(idx)  # the sizes now call for FLAT: the HNSW and IVF indexes are the wrong kind
    assert not report.ok
    text = "\n".join(report.problems)
    assert "global collection's index is HNSW_M32, its 48 vectors call for FLAT (--repair rebuilds it)" in text
    assert "patches collection's index is IVF_SQ8" in text
    report = verify(idx, repair=True)
    assert sum("rebuilt the" in r for r in report.repaired) == 2, report.repaired
    assert open_store(uri, embedder.dim).index_kind("global") == "FLAT" and verify(idx).ok
