"""One store test suite, run against the FAISS store and against Milvus (Milvus Lite, the same engine
embedded, through pymilvus): ids, upserts, deletes by photo, tag filters, photo filters, persistence."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import need

from indexer.errors import ConfigError
from indexer.vectors import open_store

D = 32


def unit(rng, n):
    x = rng.normal(size=(n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(params=["faiss", "milvus-lite"])
def uri(request, tmp_path):
    if request.param == "faiss":
        return f"faiss://{tmp_path / 'vectors'}"
    need("milvus_lite", "the lite extra (Milvus Lite)")
    return f"milvus-lite://{tmp_path / 'milvus.db'}?name=photos"


def filled(uri):
    rng = np.random.default_rng(0)
    s = open_store(uri, D)
    g = unit(rng, 20)
    s.add("global", np.arange(1, 21), np.arange(1, 21), g)
    p = unit(rng, 20 * 4)
    s.add("patches", np.arange(1, 21).repeat(4) * 4 + np.tile(np.arange(4), 20), np.arange(1, 21).repeat(4), p)
    o = unit(rng, 10)
    s.add("objects", np.arange(1, 11) * 256, np.arange(1, 11), o)
    s.set_tags([1, 2, 3, 4], [["cat"], ["dog", "cat"], ["boat"], ["cat"]])
    s.flush()
    return s, g, p, o


def brute(xb_ids, xb, q, k):
    sims = xb @ q
    order = np.argsort(-sims, kind="stable")[:k]
    return xb_ids[order], sims[order]


def test_search_equals_brute_force(uri):
    s, g, p, o = filled(uri)
    assert (s.count("global"), s.count("patches"), s.count("objects")) == (20, 80, 10)
    for j in (0, 7, 13):
        D_, I = s.search("global", g[j], 5)
        ids, sims = brute(np.arange(1, 21), g, g[j], 5)
        assert I[0].tolist() == ids.tolist() and np.allclose(D_[0], sims, atol=1e-5)
    D_, I = s.search("objects", o[3], 3)
    assert I[0, 0] == 4 * 256 and D_[0, 0] > 0.999
    assert np.allclose(s.get("global", [3, 1]), g[[2, 0]], atol=1e-6)


def test_filters_by_tag_and_photos(uri):
    s, g, p, o = filled(uri)
    _, I = s.search("global", g[10], 10, tag="cat")
    assert sorted(I[0][I[0] >= 0].tolist()) == [1, 2, 4]
    _, I = s.search("objects", o[0], 10, tag="boat")
    assert I[0][I[0] >= 0].tolist() == [3 * 256]
    _, I = s.search("patches", p[0], 100, photos=[5, 6])
    assert set((I[0][I[0] >= 0] // 4).tolist()) == {5, 6} and (I[0] >= 0).sum() == 8
    _, I = s.search("global", g[0], 10, photos=[1, 2, 3], tag="cat")
    assert sorted(I[0][I[0] >= 0].tolist()) == [1, 2]


def test_upsert_delete_and_reopen(uri):
    s, g, p, o = filled(uri)
    new = unit(np.random.default_rng(1), 1)
    s.add("global", [5], [5], new)  # a changed photo: replaced, not duplicated
    assert s.count("global") == 20
    _, I = s.search("global", new[0], 1)
    assert I[0, 0] == 5
    s.remove_photos([1, 2, 3])
    s.flush()
    assert (s.count("global"), s.count("patches"), s.count("objects")) == (17, 68, 7)
    _, I = s.search("global", g[0], 20)
    assert not {1, 2, 3} & set(I[0].tolist())
    again = open_store(uri, D)  # persisted
    assert again.count("global") == 17
    _, I = again.search("global", g[10], 10, tag="cat")
    assert I[0][I[0] >= 0].tolist() == [4]


def test_bad_uris_are_clear():
    with pytest.raises(ConfigError, match="unknown store"):
        open_store("redis://x", D)
    with pytest.raises(ConfigError, match="needs a host"):
        open_store("milvus:///photos", D)
    with pytest.raises(ConfigError, match="unknown vector collection"):
        open_store("faiss:///tmp/x-never", D).count("faces")


def test_index_and_serve_with_milvus_behind(photos, embedder, tiny_model, tmp_path):
    """`index --store milvus-lite://...`: Milvus gets every vector and answers global, tag, region and delete."""
    need("milvus_lite", "the lite extra (Milvus Lite)")
    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings
    from indexer.runner import IndexConfig, index_folder
    from search import Engine

    cfg = IndexConfig(workers=0, progress=False)
    plain = tmp_path / "plain"
    index_folder(photos, plain, embedder, cfg)
    uri = f"milvus-lite://{tmp_path / 'm.db'}?name=photos"
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, cfg, store=uri)
    e, local = Engine(idx, embedder=embedder), Engine(plain, embedder=embedder)
    assert e.vectors is not None and e.manifest.store == uri
    assert e.vectors.count("global") == 48 and e.vectors.count("patches") == 48 * 256
    q = sorted(photos.rglob("*.jpg"))[5]
    a, b = e.similar(q, 10), local.similar(q, 10)
    assert [h.photo_id for h in a] == [h.photo_id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    ra, rb = e.region(q, 5, box=(10, 10, 150, 120)), local.region(q, 5, box=(10, 10, 150, 120))
    assert [h.photo_id for h in ra][:3] == [h.photo_id for h in rb][:3]  # SQ8 codes locally, exact floats in Milvus
    # tags go to Milvus too, and filter there
    from indexer.manifest import Manifest
    from indexer.vectors import open_store
    from indexer.writer import Writer

    with Writer(idx, Manifest.load_current(idx), vectors=open_store(uri, embedder.dim)) as w:
        w.set_labels([1, 2, 9], [[("kayak", 0.9)], [("kayak", 0.5)], [("tree", 0.7)]])
        w.commit()
    e.refresh()
    assert sorted(h.photo_id for h in e.similar(q, 10, label="kayak")) == [1, 2]
    # the server searches Milvus; a delete reaches it
    token = "t0ken-for-the-tests-0123456789"
    with local_client(create_app(Settings(index=idx, token=token, model=str(tiny_model), device="cpu", workers=0))) as client:
        hits = client.get("/photos/3/similar", params={"k": 5}).json()["results"]
        assert hits[0]["id"] == 3
        assert client.delete("/photos/3", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert 3 not in [h["id"] for h in client.get("/photos/4/similar", params={"k": 48}).json()["results"]]
    assert open_store(uri, embedder.dim).count("global") == 47
    # a rerun after the delete re-adds the photo once (upsert), as the local files do
    index_folder(photos, idx, embedder, cfg)
    assert open_store(uri, embedder.dim).count("global") == 48


def test_a_store_written_by_one_process_is_searched_by_the_next(uri):
    """As the CLI does: `index` writes and exits, `search` opens the store anew (Milvus loads released collections)."""
    write = (f"import numpy as np; from indexer.vectors import open_store; s = open_store({uri!r}, {D}); "
             f"x = np.eye({D}, dtype=np.float32)[:5]; s.add('global', np.arange(5), np.arange(5), x); s.flush()")
    read = (f"import numpy as np; from indexer.vectors import open_store; s = open_store({uri!r}, {D}); "
            f"print(s.search('global', np.eye({D}, dtype=np.float32)[3], 1)[1][0, 0], s.count('global'))")
    for code in (write, read):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["3", "5"]
