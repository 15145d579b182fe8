"""One query model: several examples, negative examples and metadata filters, answered by Engine.search on a real
index of real photos (and real copies of them) with real EXIF."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_meta import write_exif

from indexer.runner import IndexConfig, index_folder
from search import BadQuery, Engine, EngineConfig, Example, Filters, SearchQuery
from search.query import great_circle_km, parse_date, parse_example, parse_id_example

CFG = IndexConfig(batch_size=16, workers=0, progress=False)


def names(hits) -> list[str]:
    return [os.path.basename(h.path) for h in hits]


@pytest.fixture
def copies(photos, embedder, tmp_path):
    """48 photos; A and B (positives) and C (negative: the photo most like A) each with two byte copies."""
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    engine = Engine(idx, embedder=embedder)
    files = sorted(photos.rglob("*.jpg"))
    a, b = files[3], files[30]
    near_a = [h.path for h in engine.similar(str(a), k=5) if h.path not in (str(a), str(b))]
    c = near_a[0]
    for src, tag in ((a, "A"), (b, "B"), (c, "C")):
        for i in (1, 2):
            shutil.copy(src, photos / f"copy{i}_{tag}.jpg")
    index_folder(photos, idx, embedder, CFG)
    engine = Engine(idx, embedder=embedder)
    return engine, str(a), str(b), c


def test_negative_copies_leave_and_positive_copies_stay(copies):
    engine, a, b, c = copies
    k = 10
    plain = names(engine.search(SearchQuery((Example(a),), k=k)).hits)
    assert {"copy1_C.jpg", "copy2_C.jpg"} <= set(plain)  # without feedback the negative's copies are near A
    q = SearchQuery((Example(a), Example(b)), unlike=(Example(c),), k=k)
    r = engine.search(q)
    got = names(r.hits)
    assert r.mode == "feedback" and len(got) == k
    assert not {"copy1_C.jpg", "copy2_C.jpg", os.path.basename(c)} & set(got)
    positives = {os.path.basename(a), "copy1_A.jpg", "copy2_A.jpg", os.path.basename(b), "copy1_B.jpg", "copy2_B.jpg"}
    assert set(got[:6]) == positives, got  # each positive's own copies are the top six
    # the same query by indexed id (numbers are ids) and with the negative as a region of it
    ids = {h.path: h.photo_id for h in engine.search(SearchQuery((Example(a),), k=len(engine))).hits}
    by_id = engine.search(SearchQuery((Example(ids[a]), Example(ids[b])), unlike=(Example(ids[c]),), k=k))
    assert names(by_id.hits) == got
    w, h = engine.example_size(Example(c))
    region = engine.search(SearchQuery((Example(a), Example(b)), unlike=(Example(c, box=(0, 0, w, h)),), k=k))
    assert not {"copy1_C.jpg", "copy2_C.jpg"} & set(names(region.hits))


def test_feedback_scores_equal_brute_force(copies):
    engine, a, b, c = copies
    allids = np.array(sorted(engine.path_of(list(range(1, 200)))))
    x = engine.global_vectors(allids)
    va, vb, vc = (engine.embed_query(p) for p in (a, b, c))
    pos, neg = np.maximum(x @ va, x @ vb), x @ vc
    score = np.where(pos > neg, pos, pos - neg - 2)
    want = allids[np.lexsort((allids, -score))][:8]
    got = engine.search(SearchQuery((Example(a), Example(b)), unlike=(Example(c),), k=8)).hits
    assert [h.photo_id for h in got] == want.tolist()
    # a region example scores by late interaction: its own photo's copies come first
    w, h = engine.example_size(Example(b))
    hits = engine.search(SearchQuery((Example(b, box=(0, 0, w / 2, h / 2)), Example(a)), k=6)).hits
    assert set(names(hits)) == {os.path.basename(a), os.path.basename(b), "copy1_A.jpg", "copy2_A.jpg",
                                "copy1_B.jpg", "copy2_B.jpg"}
    # ... and says where it matched, as a region result does: B's copies match the box's cells (the top-left quarter)
    grid = engine.manifest.grid
    for hit in hits:
        if "B" in hit.path.rsplit("/", 1)[-1] or hit.path == b:
            assert hit.heat is not None and hit.heat.shape == (grid, grid) and hit.box is not None
            assert hit.box[0] < w / 2 and hit.box[1] < h / 2  # it starts in the quarter the region came from
            assert hit.score <= 1.0
        else:
            assert hit.box is None and hit.heat is None  # A's copies: matched as a whole photo


@pytest.fixture
def described(photos, embedder, tmp_path):
    """The 48 photos, 6 of them rewritten with EXIF: 3 Leica in Paris in 2019, 2 Canon in New York in 2021, 1 Canon
    without GPS in 2023 (in a folder 'trip')."""
    files = sorted(photos.rglob("*.jpg"))
    exif = [("Leica", "M11", "2019:05:01 10:00:00", (48.8584, 2.2945)), ("Leica", "M11", "2019:05:02 10:00:00", (48.8606, 2.3376)),
            ("Leica", "Q2", "2019:05:03 10:00:00", (48.853, 2.3499)), ("Canon", "EOS R5", "2021:09:10 12:00:00", (40.7484, -73.9857)),
            ("Canon", "EOS R5", "2021:09:11 12:00:00", (40.6892, -74.0445)), ("Canon", "EOS R6", "2023:01:01 08:00:00", None)]
    made = []
    for f, (make, model, taken, gps) in zip(files[-6:], exif):
        dst = photos / "trip" / f.name
        write_exif(f, dst, original=taken, make=make, model=model, gps=gps)
        f.unlink()
        made.append(dst.name)
    index_folder(photos, tmp_path / "idx", embedder, CFG)
    return Engine(tmp_path / "idx", embedder=embedder), photos, made


def test_filters_on_metadata(described):
    engine, photos, made = described
    q = str(sorted(photos.rglob("*.jpg"))[0])

    def found(**f):
        return set(names(engine.search(SearchQuery((Example(q),), filters=Filters(**f), k=48)).hits))

    assert found(camera="leica") == set(made[:3])
    assert found(camera="eos r5") == set(made[3:5])
    assert found(near=(48.8566, 2.3522, 10)) == set(made[:3])  # central Paris, 10 km
    assert found(near=(48.8566, 2.3522, 0.1)) == set()
    assert found(near=(40.7128, -74.0060, 20)) == set(made[3:5])  # New York; the Canon without GPS never passes
    assert found(taken_after="2019-05-02", taken_before="2021-09-11") == set(made[1:4])
    assert found(folder=str(photos / "trip")) == set(made)
    assert found(folder=str(photos / "tri")) == set()  # a prefix of a folder's name is not the folder
    assert found(folder=str(photos / "trip"), camera="canon", taken_after="2022-01-01") == {made[5]}
    assert len(found(taken_after="1971-01-01")) == 48  # photos without EXIF are dated by their file's mtime
    w, h = engine.example_size(Example(q))  # the same filters in region search
    region = engine.search(SearchQuery((Example(q, box=(0, 0, w / 2, h / 2)),), filters=Filters(camera="leica"), k=10))
    assert set(names(region.hits)) == set(made[:3]) and region.mode == "region"


def test_a_filter_matching_k_far_photos_still_returns_all_k(described):
    engine, photos, made = described
    for f in sorted(photos.rglob("*.jpg")):  # queries whose nearest photos are not the filtered ones
        hits = engine.search(SearchQuery((Example(str(f)),), k=len(engine))).hits
        far = names(hits)[-5:]
        if not set(made[:3]) & set(names(hits)[:20]):
            break
    for k, box in ((3, None), (3, (0, 0, 60, 60))):
        r = engine.search(SearchQuery((Example(str(f), box=box),), filters=Filters(camera="Leica"), k=k))
        assert set(names(r.hits)) == set(made[:3]), (box, names(r.hits))
    fb = engine.search(SearchQuery((Example(str(f)), Example(str(photos / "trip" / made[5]))), filters=Filters(camera="leica"), k=3))
    assert set(names(fb.hits)) == set(made[:3])
    assert far  # (the loop ran)


def test_browse_pages_sorted_and_filtered(described):
    engine, photos, made = described
    total, page = engine.browse(Filters(camera="canon"), sort="taken", order="desc")
    assert total == 3 and [p.taken for p in page] == ["2023-01-01T08:00:00", "2021-09-11T12:00:00", "2021-09-10T12:00:00"]
    assert page[0].make == "Canon" and page[0].lat is None and page[1].lat == pytest.approx(40.6892, abs=1e-4)
    total, first = engine.browse(sort="path", limit=10)
    _, second = engine.browse(sort="path", offset=10, limit=10)
    assert total == 48 and len(first) == len(second) == 10
    paths = [p.path for p in first + second]
    assert paths == sorted(paths) and len(set(paths)) == 20
    total, near = engine.browse(Filters(near=(48.8566, 2.3522, 10)), sort="taken")
    assert total == 3 and [os.path.basename(p.path) for p in near] == made[:3]
    with pytest.raises(BadQuery):
        engine.browse(sort="size")


def test_parsers_and_query_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "42", "PNG")
    assert parse_example("42") == Example(42)
    assert parse_example("./42") == Example("./42")
    assert parse_example("42@0,0,4,4") == Example(42, box=(0, 0, 4, 4))
    assert parse_example("./42@1,2,3,4").box == (1, 2, 3, 4)
    with pytest.raises(BadQuery, match="not found"):
        parse_example("nope.jpg")
    assert parse_date("2021-06-30") == "2021-06-30T00:00:00" and parse_date("2021-06-30T14:05") == "2021-06-30T14:05:00"
    with pytest.raises(BadQuery):
        parse_date("30/06/2021")
    with pytest.raises(BadQuery):
        Filters(near=(91, 0, 1))
    assert SearchQuery((Example(1, objects=True), Example(2))).like[0].mode == "objects"  # object examples mix
    with pytest.raises(BadQuery):
        Example(1, box=(0, 0, 1, 1), part=1)
    # every example form, on the command line (paths or ids) and over HTTP (ids or upload:N, never paths)
    assert parse_example("42@object") == Example(42, objects=True)
    assert parse_example("42@object=1,2,30,40") == Example(42, objects=True, box=(1, 2, 30, 40))
    assert parse_example("./42@point=3,4") == Example("./42", point=(3, 4))
    assert parse_example("42@part=2") == Example(42, part=2)
    assert parse_id_example("7@point=1,2") == Example(7, point=(1, 2))
    assert parse_id_example("upload:1@object", [(b"a", (1, 1)), (b"b", (5, 6))]) == Example(b"b", objects=True, size=(5, 6))
    for bad in ("./42", "upload:0", "7@part=9", "7@object=1,2", "7@point=1"):
        with pytest.raises(BadQuery):
            parse_id_example(bad)
    assert great_circle_km(np.array([48.8566]), np.array([2.3522]), 51.5074, -0.1278)[0] == pytest.approx(343.5, abs=1)


@pytest.fixture
def described_app(described, tiny_model):
    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings

    engine, photos, made = described
    settings = Settings(index=engine.root, model=str(tiny_model), device="cpu", workers=0)
    with local_client(create_app(settings)) as client:
        yield client, engine, photos, made


def test_http_feedback_filters_and_browse(described_app):
    client, engine, photos, made = described_app
    ids = {os.path.basename(p.path): p.photo_id for p in engine.browse(limit=100)[1]}
    leica = sorted(ids[m] for m in made[:3])
    r = client.get(f"/photos/{ids[made[3]]}/similar", params={"k": 3, "camera": "LEICA"})
    assert r.status_code == 200, r.text
    assert sorted(h["id"] for h in r.json()["results"]) == leica and r.json()["mode"] == "global"
    r = client.get(f"/photos/{leica[0]}/similar", params={"k": 5, "like": [str(leica[1]), f"{leica[2]}@0,0,60,60"],
                                                          "unlike": [str(ids[made[3]])], "near": "48.8566,2.3522,10"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "feedback" and sorted(h["id"] for h in body["results"]) == leica
    with open(photos / "trip" / made[0], "rb") as f:
        data = f.read()
    r = client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")},
                    params={"k": 10, "taken_after": "2021-01-01", "folder": str(photos / "trip"), "unlike": [str(leica[0])]})
    assert r.status_code == 200, r.text
    assert {h["id"] for h in r.json()["results"]} == {ids[m] for m in made[3:]}
    page = client.get("/photos", params={"sort": "taken", "order": "desc", "limit": 2, "offset": 1, "camera": "canon"}).json()
    assert page["total"] == 3 and [p["taken"] for p in page["photos"]] == ["2021-09-11T12:00:00", "2021-09-10T12:00:00"]
    assert page["photos"][0]["make"] == "Canon" and page["photos"][0]["lat"] == pytest.approx(40.6892, abs=1e-4)
    assert client.get("/photos", params={"limit": 5}).json()["total"] == 48
    for bad in ({"sort": "size"}, {"near": "1,2"}, {"taken_after": "yesterday"}, {"limit": -1}):
        r = client.get("/photos", params=bad)
        assert r.status_code == 422 and "detail" in r.json(), (bad, r.text)
    for bad in ({"like": "../etc/passwd"}, {"like": "5@1,2"}, {"unlike": "x"}):
        r = client.get(f"/photos/{leica[0]}/similar", params=bad)
        assert r.status_code == 422, (bad, r.text)
    assert client.get(f"/photos/{leica[0]}/similar", params={"like": "999999"}).status_code == 404


def test_cli_like_unlike_filters_and_ls(described, tiny_model):
    from test_cli import run

    engine, photos, made = described
    idx = str(engine.root)
    ids = {os.path.basename(p.path): p.photo_id for p in engine.browse(limit=100)[1]}
    trip = photos / "trip"
    hits = json.loads(run("search", idx, str(trip / made[0]), "--like", str(ids[made[1]]), "--like", f"{trip / made[2]}@0,0,50,50",
                          "--unlike", str(ids[made[3]]), "--camera", "leica", "--near", "48.8566,2.3522,10",
                          "-k", "5", "--json").stdout)
    assert sorted(h["id"] for h in hits) == sorted(ids[m] for m in made[:3])
    out = json.loads(run("ls", idx, "--camera", "canon", "--sort", "taken", "--order", "desc", "--json").stdout)
    assert out["total"] == 3 and [p["model"] for p in out["photos"]] == ["EOS R6", "EOS R5", "EOS R5"]
    text = run("ls", idx, "--folder", str(trip), "--taken-before", "2020-01-01")
    assert len(text.stdout.splitlines()) == 3 and "Leica M11" in text.stdout and "of 3 photos" in text.stderr
    bad = run("search", idx, "5", "--id", "--like", "nope.jpg", check=False)
    assert bad.returncode == 2 and "a number alone is a photo id" in bad.stderr and "Traceback" not in bad.stderr


def test_filters_return_k_on_ivf_kinds_whose_probe_misses(described, embedder, tmp_path):
    """IVF kinds visit nprobe lists only: the filtered photos may lie in lists the probe skips; k still come back."""
    engine, photos, made = described
    idx = tmp_path / "ivf"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False, global_kind="IVF8,Flat", patch_kind="IVF8,SQ8"))
    ivf = Engine(idx, EngineConfig(nprobe=1), embedder=embedder)
    assert ivf.manifest.global_kind.startswith("IVF") and ivf.manifest.patch_kind.startswith("IVF")
    leica = ivf.filter_ids(Filters(camera="leica"))
    assert ivf.global_plan(None) == "ivf" and ivf.global_plan(leica) == "scan"  # 3 photos pass: scored exactly
    assert len(leica) <= ivf.scan_limit() == max(Engine.SCAN_MAX, ivf.global_index.probe_reads())
    for scan_max in (ivf.scan_limit(), 0):  # the scan plan, then the probe with its fallback when the probe misses
        ivf.scan_limit = lambda: scan_max  # noqa: B023 (used inside this iteration only)
        assert ivf.global_plan(leica) == ("scan" if scan_max else "ivf")
        for f in sorted(photos.rglob("*.jpg"))[:6]:
            for box in (None, (0, 0, 60, 60)):
                r = ivf.search(SearchQuery((Example(str(f), box=box),), filters=Filters(camera="leica"), k=3))
                assert set(names(r.hits)) == set(made[:3]), (f.name, box, names(r.hits))


def test_filter_columns_select_what_the_catalogs_sql_selects_and_search_inside_them_is_exact(tmp_path):
    """filter_ids (numpy over the commit's columns) and browse (SQL over the catalog) let the same photos through,
    on a catalog with varied, missing and non-ASCII fields, failures, deletes and replacements (tombstones in an
    older segment); the global search inside each filter equals brute force (a FAISS bitmap for the wide filters, an
    id batch for the narrow ones)."""
    from test_segments import add, manifest

    from indexer.reader import PhotoMeta
    from indexer.writer import Writer

    rng = np.random.default_rng(7)
    makes = [None, "Canon", "LEICA", "Leica Camera AG", "NIKON CORPORATION", "Ünïcode"]
    models = [None, "EOS R5", "M11", "Q2", "Z 6", "α7"]
    folders = ["/p/trip", "/p/trip2", "/p/trip/day1", "/p", "/other/trip", ""]
    tags = ["cat", "Dog", "boat", "tabby cat", "CAT", "kite"]
    idx = tmp_path / "idx"
    with Writer(idx, manifest()) as w:
        ids = [w.allocate_id() for _ in range(300)]
        vec = dict(zip(ids, add(w, ids, 0)))
        for i in ids:
            if rng.random() < 0.1:
                continue  # no meta row at all
            taken = None if rng.random() < 0.2 else f"20{rng.integers(10, 24)}-0{rng.integers(1, 10)}-1{rng.integers(0, 10)}T1{rng.integers(0, 10)}:00:00"
            lat, lon = (None, None) if rng.random() < 0.25 else (48.85 + rng.normal(0, 0.2), 2.35 + rng.normal(0, 0.3))
            if rng.random() < 0.05:
                lat, lon = float(rng.uniform(-90, 90)), None  # half a position: never near anything
            w.set_meta(i, f"{folders[rng.integers(len(folders))]}/{i}.jpg", PhotoMeta(
                taken=taken, make=makes[rng.integers(len(makes))], model=models[rng.integers(len(models))], lat=lat, lon=lon))
        tagged = [i for i in ids if rng.random() < 0.7]
        w.set_labels(tagged, [[(t, 0.2) for t in rng.choice(tags, 5, replace=False)] for _ in tagged])
        w.commit()
    with Writer(idx, None) as w:
        vec.update(zip(ids[:40], add(w, ids[:40], 1)))  # replaced: their first vectors are tombstones in segment 1
        w.record_failure(ids[50], "/p/broken.jpg", 1, 1, None, "broken")
        w.delete(ids[60:70])
        w.commit()
    engine = Engine(idx)
    everyone = {p.photo_id for p in engine.browse(Filters(), limit=10**6)[1]}
    assert len(everyone) == 289 and len(engine) == 289
    d = ["2012-03-15T12:00:00", "2015-01-01T00:00:00", "2019-06-30", "2023-09-19T19:00:00"]
    filters = [Filters(camera=c) for c in ("leica", "LEICA M", "canon eos", "α7", "ünï", "Ünï", "eos r5", " ", "nikon z")]
    filters += [Filters(folder=f) for f in ("/p/trip", "/p/trip/", "/p", "/", "/other", "/p/tri")]
    filters += [Filters(taken_after=parse_date(a)) for a in d] + [Filters(taken_before=parse_date(b)) for b in d]
    filters += [Filters(taken_after=parse_date(d[0]), taken_before=parse_date(d[2])), Filters(taken_after=parse_date(d[3]))]
    filters += [Filters(near=n) for n in ((48.85, 2.35, 10), (48.85, 2.35, 0), (0, 0, 20100), (-33.9, 151.2, 50))]
    filters += [Filters(label=t) for t in ("cat", "CAT", "dog", "tabby cat", "kite")]
    filters += [Filters(label="cat", camera="leica", folder="/p", taken_after=parse_date(d[1]), near=(48.85, 2.35, 30)),
                Filters(label="boat", taken_before=parse_date(d[2])), Filters(camera="canon", near=(48.9, 2.4, 15))]
    for y in ("2013", "2017", "2021"):  # date ranges narrow enough for Columns.narrow, alone and with each other field
        day = Filters(taken_after=parse_date(f"{y}-03-01"), taken_before=parse_date(f"{y}-05-01"))
        filters += [day, replace(day, camera="leica"), replace(day, folder="/p/trip"), replace(day, label="cat"),
                    replace(day, near=(48.85, 2.35, 40))]
    resident = Engine(idx, EngineConfig(resident=True))  # serve's engine: the same answers from vectors read whole
    cols, sizes, narrowed = engine.columns, set(), 0
    for f in filters:
        if f.taken_after or f.taken_before:  # the date-order slice selects what the passes over every id select
            assert cols.narrow(f, share=1).tolist() == np.flatnonzero(cols.mask(f)).tolist(), f
            narrowed += cols.narrow(f) is not None
        else:
            assert cols.narrow(f, share=1) is None
        allowed = engine.filter_ids(f)
        got = everyone if allowed is None else set(allowed.tolist())
        assert allowed is None or list(allowed) == sorted(got)
        total, page = engine.browse(f, limit=10**6)
        assert got == {p.photo_id for p in page} and total == len(got), f
        sizes.add(len(got))
        if not got:
            continue
        passing = np.array(sorted(got))
        for q in (ids[45], ids[200]):
            s = np.array([vec[i] for i in passing]) @ vec[q]
            hits = engine.search(SearchQuery((Example(q),), filters=f, k=10)).hits
            assert [h.photo_id for h in hits] == passing[np.argsort(-s, kind="stable")[:10]].tolist(), f
            assert resident.search(SearchQuery((Example(q),), filters=f, k=10)).hits == hits
    assert narrowed >= 10, narrowed
    assert min(sizes) == 0 and max(sizes) > len(everyone) // 2 and any(0 < n < 5 for n in sizes)  # batch and bitmap both ran
    leica = engine.filter_ids(Filters(camera="leica"))
    with Writer(idx, None) as w:  # a new commit: refresh() reads the columns of the catalog as it now is
        w.set_meta(int(leica[0]), "/p/0.jpg", PhotoMeta(make="Canon"))
        w.commit()
    assert engine.refresh() and engine.filter_ids(Filters(camera="leica")).tolist() == leica[1:].tolist()


def test_top_k_by_partition_equals_a_stable_sort_of_all_with_ties():
    """The scan plan's top k (a partition, then a sort of those at least as good as the k-th) must rank exactly as
    sorting every score would, ties going to the lower id."""
    from search.engine import top_k

    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = int(rng.integers(1, 200)), int(rng.integers(1, 20))
        ids = np.sort(rng.choice(10_000, n, replace=False)).astype(np.int64)
        scores = rng.integers(0, 5, n).astype(np.float32)  # few distinct values: ties at the cut
        order = np.argsort(-scores, kind="stable")[:k]
        got_ids, got_scores = top_k(ids, scores, k)
        assert got_ids.tolist() == ids[order].tolist() and got_scores.tolist() == scores[order].tolist()
