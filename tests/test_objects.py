"""SAM objects: a real (tiny, random-weight) SamModel loaded by path, crop geometry, RLE, the object
index through the Writer and the Engine, incremental runs and a killed run resumed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import sample_photos
from PIL import Image
from test_cli import ENV, run

from indexer.errors import ConfigError
from indexer.faissio import index_ids
from indexer.manifest import MAX_OBJECTS, Manifest
from indexer.objects import NEUTRAL, Mask, Segmenter, SegmenterConfig, box_nms, crop_object, mask_box, rle_decode, rle_encode
from indexer.runner import IndexConfig, index_folder, store_objects
from indexer.snapshot import Snapshot, live_generation
from indexer.testing import save_random_sam
from indexer.verify import verify
from indexer.writer import Writer
from search import Engine

# random weights: SAM's confidences mean nothing, so keep every mask it makes
LOOSE = dict(min_iou=-1e9, min_stability=0.0, min_area=0.0, nms_iou=1.0, points_per_side=2, max_masks=4)
CFG = IndexConfig(workers=0, progress=False, batch_size=4)


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    return save_random_sam(tmp_path_factory.mktemp("sam") / "sam", "tiny")


@pytest.fixture(scope="module")
def segmenter(sam_dir):
    return Segmenter(SegmenterConfig(model=str(sam_dir), **LOOSE), device=torch.device("cpu"))


def photo(i: int) -> np.ndarray:
    return np.asarray(Image.open(sample_photos(1)[i]).convert("RGB"))


# ---------------------------------------------------------------- SAM through the real model class


def test_point_and_box_prompts_give_masks_of_the_photos_size(segmenter):
    for img in (photo(0), photo(3)[:150, :97]):  # landscape, and an odd-sized portrait crop
        h, w = img.shape[:2]
        for m in (segmenter.from_point(img, w * 0.4, h * 0.6), segmenter.from_box(img, (5, 5, w * 0.7, h * 0.8))):
            assert m is not None and m.mask.shape == (h, w) and m.mask.dtype == bool
            assert m.box == mask_box(m.mask) and m.area > 0
    # the prompt reaches the decoder: different clicks give different masks
    img = photo(5)
    a, b = segmenter.from_point(img, 10, 10), segmenter.from_point(img, img.shape[1] - 10, img.shape[0] - 10)
    assert not np.array_equal(a.mask, b.mask)


def test_automatic_masks_respect_the_settings(sam_dir):
    img = photo(2)
    h, w = img.shape[:2]
    everything = Segmenter(SegmenterConfig(model=str(sam_dir), **(LOOSE | dict(points_per_side=3, max_masks=27))),
                           device=torch.device("cpu")).automatic(img)
    assert 1 <= len(everything) <= 27 and all(m.mask.shape == (h, w) for m in everything)
    scores = [m.score for m in everything]
    assert scores == sorted(scores, reverse=True)
    few = Segmenter(SegmenterConfig(model=str(sam_dir), **(LOOSE | dict(points_per_side=3, max_masks=2))),
                    device=torch.device("cpu")).automatic(img)
    assert [m.box for m in few] == [m.box for m in everything[:2]]
    # thresholds are applied: nothing passes an impossible predicted IoU
    none = Segmenter(SegmenterConfig(model=str(sam_dir), **(LOOSE | dict(min_iou=2.0))), device=torch.device("cpu"))
    assert none.automatic(img) == []
    # duplicates removed: with NMS every kept pair of boxes overlaps at most nms_iou
    from indexer.objects import box_iou

    nms = Segmenter(SegmenterConfig(model=str(sam_dir), **(LOOSE | dict(points_per_side=3, max_masks=27, nms_iou=0.5))),
                    device=torch.device("cpu")).automatic(img)
    boxes = np.array([m.box for m in nms], float)
    iou = box_iou(boxes, boxes)
    assert (iou[~np.eye(len(boxes), dtype=bool)] <= 0.5).all()


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="max masks must be 1..256"):
        SegmenterConfig(max_masks=1000)
    with pytest.raises(ConfigError, match="points per side"):
        SegmenterConfig(points_per_side=0)


# ---------------------------------------------------------------- geometry and RLE


def test_crop_is_exact_inside_the_mask_and_neutral_outside():
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:30, 20:60] = True  # 40 wide, 20 high
    mask[10, 20] = False  # a hole: neutral too
    assert mask_box(mask) == (20, 10, 60, 30)
    c = crop_object(img, mask, 40)  # side == longest box side: no resampling, exact pixels
    assert c.shape == (40, 40, 3)
    top = (40 - 20) // 2
    assert (c[:top] == NEUTRAL).all() and (c[top + 20:] == NEUTRAL).all()  # centred, aspect kept
    inner = c[top:top + 20]
    assert (inner[0, 0] == NEUTRAL).all()
    ok = mask[10:30, 20:60]
    assert np.array_equal(inner[ok], img[10:30, 20:60][ok])


def test_crop_of_masks_touching_the_borders_and_of_one_pixel():
    img = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    corner = np.zeros((50, 70), bool)
    corner[:12, :9] = True  # top-left corner
    assert mask_box(corner) == (0, 0, 9, 12)
    c = crop_object(img, corner, 12)
    assert np.array_equal(c[:, 1:10], img[:12, :9])  # (12 - 9) // 2 = 1 column of padding on the left
    edge = np.zeros((50, 70), bool)
    edge[30:, 60:] = True  # bottom-right edge
    assert mask_box(edge) == (60, 30, 70, 50)
    assert np.array_equal(crop_object(img, edge, 20)[:, 5:15], img[30:, 60:])
    full = np.ones((50, 70), bool)
    assert mask_box(full) == (0, 0, 70, 50)
    one = np.zeros((50, 70), bool)
    one[49, 69] = True
    assert mask_box(one) == (69, 49, 70, 50)
    assert np.array_equal(crop_object(img, one, 1)[0, 0], img[49, 69])
    big = crop_object(img, one, 224)
    assert big.shape == (224, 224, 3) and (big == img[49, 69]).all()  # one pixel, resized: its own colour
    with pytest.raises(ValueError, match="empty mask"):
        mask_box(np.zeros((4, 4), bool))


def test_rle_round_trip_and_coco_layout():
    # COCO: column-major runs starting with 0s: [[0,1],[1,1]] -> F-order 0,1,1,1 -> [1, 3]
    assert rle_encode(np.array([[0, 1], [1, 1]], bool))["counts"] == [1, 3]
    assert rle_encode(np.array([[1, 1], [0, 1]], bool))["counts"] == [0, 1, 1, 2]
    rng = np.random.default_rng(0)
    cases = [np.zeros((7, 5), bool), np.ones((7, 5), bool), rng.random((33, 41)) > 0.5, rng.random((1, 1)) > 2]
    single = np.zeros((9, 9), bool)
    single[8, 8] = True
    cases.append(single)
    for m in cases:
        r = rle_encode(m)
        assert r["size"] == list(m.shape) and sum(r["counts"]) == m.size
        assert np.array_equal(rle_decode(json.loads(json.dumps(r))), m)
    with pytest.raises(ValueError):
        rle_decode({"size": [2, 2], "counts": [1, 1]})


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float)
    assert box_nms(boxes, np.array([0.5, 0.9, 0.1]), 0.7) == [1, 2]


# ---------------------------------------------------------------- the object index


def _paste_collection(tmp_path, embedder):
    """Twelve photos; the object (a crop of photo 0) is pasted into photos 3, 7 and 10 at known places.
    Every photo also gets decoy objects. Objects are stored through store_objects and the Writer."""
    folder = tmp_path / "photos"
    folder.mkdir()
    src = photo(0)
    obj = src[40:120, 60:160].copy()  # 100 x 80
    places = {3: (15, 20), 7: (90, 30), 10: (40, 70)}  # photo -> (x, y) of the paste
    for i in range(12):
        img = photo(i + 1).copy()
        if i in places:
            x, y = places[i]
            img[y:y + 80, x:x + 100] = obj
        Image.fromarray(img).save(folder / f"p{i:02d}.png")
    idx = tmp_path / "idx"
    index_folder(folder, idx, embedder, CFG)
    engine = Engine(idx, embedder=embedder)
    ids = {engine.path_of([h])[h]: h for h in range(1, 13)}
    with Writer(idx, Manifest.for_embedder(embedder)) as w:
        photos, found = [], []
        for i in range(12):
            img = np.asarray(Image.open(folder / f"p{i:02d}.png"))
            h, wd = img.shape[:2]
            masks = []
            for (x0, y0, x1, y1) in ((0, 0, wd // 2, h // 2), (wd // 3, h // 3, wd, h)):  # decoys
                m = np.zeros((h, wd), bool)
                m[y0:y1, x0:x1] = True
                masks.append(Mask(m, mask_box(m), 0.5))
            if i in places:
                x, y = places[i]
                m = np.zeros((h, wd), bool)
                m[y:y + 80, x:x + 100] = True
                masks.insert(0, Mask(m, mask_box(m), 0.9))
            photos.append((ids[str(folder / f"p{i:02d}.png")], img, wd, h))
            found.append(masks)
        assert store_objects(embedder, w, photos, found, batch=5) == 12 * 2 + 3
        w.set_labels([ids[str(folder / "p07.png")]], [[("boat", 0.9)]])
        w.commit()
    return folder, idx, ids, places, obj


def test_a_pasted_object_is_found_in_every_photo_with_its_box(tmp_path, embedder):
    folder, idx, ids, places, obj = _paste_collection(tmp_path, embedder)
    engine = Engine(idx, embedder=embedder)
    assert engine.object_count() == 27
    query = crop_object(obj, np.ones(obj.shape[:2], bool), engine.manifest.resolution)
    v = embedder.embed(query[None]).cls[0]
    hits = engine.objects_by_vector(v, k=5)
    want = {ids[str(folder / f"p{i:02d}.png")]: (x, y, x + 100, y + 80) for i, (x, y) in places.items()}
    assert {h.photo_id for h in hits[:3]} == set(want)
    for h in hits[:3]:
        assert h.score > 0.999 and h.box == want[h.photo_id]
        m = rle_decode(h.mask)
        assert mask_box(m) == want[h.photo_id]
        assert h.object_id // MAX_OBJECTS == h.photo_id
    assert len({h.photo_id for h in hits}) == len(hits) == 5  # one hit per photo
    # filters: a tag and an allowed set
    boat = engine.objects_by_vector(v, k=5, allowed=engine._allowed(None, "boat"))
    assert [h.photo_id for h in boat] == [ids[str(folder / "p07.png")]]
    some = {ids[str(folder / "p03.png")], ids[str(folder / "p00.png")]}
    assert {h.photo_id for h in engine.objects_by_vector(v, k=5, allowed=some)} == some
    # an indexed photo id as the query: its main stored object (largest area x score) finds itself first
    p03 = ids[str(folder / "p03.png")]
    main = max(engine.objects_of([p03])[p03], key=lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) * o["score"])
    first = engine.objects(p03, k=3)[0]
    assert (first.photo_id, first.object_id, first.box) == (p03, main["id"], main["box"]) and first.score > 0.999


def test_object_examples_mix_with_whole_photos_in_feedback(tmp_path, embedder, tiny_model):
    """An object example scores a photo by its best object's cosine, next to whole-photo examples and negatives:
    the same ranking as brute force over every stored object, each hit from the object example carrying that object,
    the same through the CLI and HTTP."""
    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings
    from search import Example, SearchQuery

    folder, idx, ids, places, obj = _paste_collection(tmp_path, embedder)
    engine = Engine(idx, embedder=embedder)
    p = {i: ids[str(folder / f"p{i:02d}.png")] for i in range(12)}
    allids = np.array(sorted(p.values()))
    objs = engine.objects_of(allids.tolist())
    main = max(objs[p[3]], key=lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) * o["score"])
    v = engine.object_index.reconstruct(int(main["id"]))
    best_obj = {q: max(objs[q], key=lambda o: float(engine.object_index.reconstruct(int(o["id"])) @ v)) for q in allids.tolist()}
    obj_sim = np.array([float(engine.object_index.reconstruct(int(best_obj[q]["id"])) @ v) for q in allids])
    x = engine.global_vectors(allids)
    pos = np.maximum(obj_sim, x @ x[allids.tolist().index(p[0])])
    neg = x @ x[allids.tolist().index(p[10])]
    score = np.where(pos > neg, pos, pos - neg - 2)
    want = allids[np.lexsort((allids, -score))][:6].tolist()
    q = SearchQuery((Example(p[3], objects=True), Example(p[0])), unlike=(Example(p[10]),), k=6)
    r = engine.search(q)
    assert r.mode == "feedback" and [h.photo_id for h in r.hits] == want
    assert {h.photo_id for h in r.hits[:2]} == {p[3], p[0]} and p[10] not in want  # both positives first, the negative out
    for h in r.hits:
        if obj_sim[allids.tolist().index(h.photo_id)] >= float(x[allids.tolist().index(h.photo_id)] @ x[allids.tolist().index(p[0])]):
            o = best_obj[h.photo_id]  # matched through the object example: where is that object
            assert (h.object_id, h.box) == (o["id"], o["box"]) and rle_decode(h.mask).any()
        else:
            assert h.object_id is None
    assert r.query_object.box == main["box"]
    # the command line: PHOTO@object
    out = json.loads(run("search", str(idx), str(p[0]), "--id", "--like", f"{p[3]}@object", "--unlike", str(p[10]), "-k", "6",
                         "--json").stdout)
    assert [h["id"] for h in out] == [h.photo_id for h in sorted(r.hits, key=lambda h: (-h.score, h.photo_id))]
    # HTTP: ID@object, and uploaded example files named upload:N
    with local_client(create_app(Settings(index=idx, model=str(tiny_model), device="cpu", workers=0))) as client:
        got = client.get(f"/photos/{p[3]}/similar", params={"objects": "true", "like": [str(p[0])], "unlike": [str(p[10])], "k": 6})
        assert got.status_code == 200, got.text
        assert [h["id"] for h in got.json()["results"]] == want
        p0 = (folder / "p00.png").read_bytes()
        p10 = (folder / "p10.png").read_bytes()
        got = client.post("/search", params={"k": 6, "like": [f"{p[3]}@object"], "unlike": ["upload:0"]},
                          files=[("image", ("q.png", p0, "image/png")), ("examples", ("n.png", p10, "image/png"))])
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["mode"] == "feedback" and [h["id"] for h in body["results"]] == want
        assert any(h["object_id"] is not None and h["box"] == list(best_obj[h["id"]]["box"]) for h in body["results"])
        bad = client.post("/search", params={"like": ["upload:1"]}, files=[("image", ("q.png", p0, "image/png")),
                                                                          ("examples", ("n.png", p10, "image/png"))])
        assert bad.status_code == 422 and "upload:1" in bad.json()["detail"]
        bad = client.post("/search", params={"like": ["upload:0@object"]}, files=[("image", ("q.png", p0, "image/png")),
                                                                                 ("examples", ("n.png", p10, "image/png"))])
        assert bad.status_code == 400 and "--objects" in bad.json()["detail"]  # an upload's object needs the index's SAM


def test_objects_replace_on_change_and_go_with_deletes(tmp_path, embedder):
    folder, idx, ids, places, obj = _paste_collection(tmp_path, embedder)
    changed, gone = ids[str(folder / "p03.png")], ids[str(folder / "p07.png")]
    Image.fromarray(photo(20)).save(folder / "p03.png")  # new content: old objects must go
    (folder / "p07.png").unlink()
    index_folder(folder, idx, embedder, CFG)
    engine = Engine(idx, embedder=embedder)
    objs = engine.objects_of(list(ids.values()))
    assert changed not in objs and gone not in objs and engine.object_count() == 27 - 3 - 3
    assert verify(idx).ok
    ids_left = np.sort(index_ids(engine.object_index))
    assert ids_left.tolist() == sorted(o["id"] for os_ in objs.values() for o in os_)


def test_index_with_objects_then_add_objects_to_an_existing_index(tmp_path, embedder, sam_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_photos(1)[:6]:
        shutil.copy(p, folder / p.name)
    seg = Segmenter(SegmenterConfig(model=str(sam_dir), **LOOSE), device=torch.device("cpu"))
    a = tmp_path / "a"
    stats = index_folder(folder, a, embedder, CFG, segmenter=seg)
    assert stats.indexed == stats.segmented == 6 and 6 <= stats.objects <= 24
    ea = Engine(a, embedder=embedder)
    assert ea.object_count() == stats.objects and ea.manifest.segmenter["model"] == str(sam_dir)
    for pid, objs in ea.objects_of(list(range(1, 7))).items():
        for o in objs:
            w, h = ea.photo_size([pid])[pid]
            assert rle_decode(o["mask"]).shape == (h, w)  # these photos are below SAM's 1024 px: masks at full size
            assert 0 <= o["box"][0] < o["box"][2] <= w and 0 <= o["box"][1] < o["box"][3] <= h
    # the same photos indexed first without objects, then with: segmented, not re-embedded
    b = tmp_path / "b"
    index_folder(folder, b, embedder, CFG)
    stats = index_folder(folder, b, embedder, CFG, segmenter=seg)
    assert stats.indexed == 0 and stats.segmented == 6
    eb = Engine(b, embedder=embedder)
    assert eb.objects_of(list(range(1, 7))).keys() == ea.objects_of(list(range(1, 7))).keys()
    strip = lambda d: {p: [(o["id"], o["box"], o["mask"]) for o in v] for p, v in d.items()}  # noqa: E731
    assert strip(eb.objects_of(list(range(1, 7)))) == strip(ea.objects_of(list(range(1, 7))))
    # a third run has nothing to do
    assert index_folder(folder, b, embedder, CFG, segmenter=seg).segmented == 0
    # other SAM settings: every photo is segmented anew
    seg2 = Segmenter(SegmenterConfig(model=str(sam_dir), **(LOOSE | dict(max_masks=1))), device=torch.device("cpu"))
    stats = index_folder(folder, b, embedder, CFG, segmenter=seg2)
    assert stats.segmented == 6 and Engine(b, embedder=embedder).object_count() == 6
    assert verify(b).ok


def test_cli_objects_point_box_and_a_killed_run_resumes(tmp_path, tiny_model, sam_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_photos(1)[:10]:
        shutil.copy(p, folder / p.name)
    sam = ["--objects", "--sam-model", str(sam_dir), "--sam-points", "2", "--sam-min-iou=-1e9",
           "--sam-min-stability", "0", "--sam-min-area", "0", "--sam-nms", "1", "--sam-max-masks", "3"]
    clean = tmp_path / "clean"
    p = run("index", str(folder), "--index", str(clean), "--model", str(tiny_model), "-q", *sam, check=False)
    assert p.returncode == 0, p.stderr
    assert "objects in 10 photos" in p.stdout
    # killed once mid-run, then resumed with --objects only: the index's own SAM settings are kept
    idx = tmp_path / "idx"
    args = [sys.executable, "-m", "api.cli", "index", str(folder), "--index", str(idx), "--model", str(tiny_model),
            "-q", "--batch-size", "2", "--commit-every", "2", "--workers", "0", *sam]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and live_generation(idx) is None:
        time.sleep(0.2)
    time.sleep(1.0)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = run("index", str(folder), "--index", str(idx), "-q", "--objects", check=False)
    assert p.returncode == 0, p.stderr

    def rows(i):
        return Snapshot.open(i).catalog().execute("SELECT id, photo_id, x0, y0, x1, y1, mask FROM objects ORDER BY id").fetchall()

    assert rows(idx) == rows(clean) and len(rows(idx)) > 0
    assert verify(idx).ok
    info = json.loads(run("info", str(idx), "--json", check=False).stdout)
    assert info["objects"] == len(rows(idx)) and info["segmenter"] == str(sam_dir)
    q = str(sorted(folder.glob("*.jpg"))[3])
    for extra in (["--objects"], ["--point", "30,40"], ["--box", "10,10,120,90", "--objects"]):
        p = run("search", str(idx), q, "-k", "4", "--json", *extra, check=False)
        assert p.returncode == 0, p.stderr
        hits = json.loads(p.stdout)
        assert len(hits) == 4 and len({h["id"] for h in hits}) == 4
        assert all(h["object"] // MAX_OBJECTS == h["id"] and rle_decode(h["mask"]).sum() > 0 for h in hits)
    p = run("search", str(idx), q, "--point", "5000,40", check=False)
    assert p.returncode == 2 and "outside" in p.stderr and "Traceback" not in p.stderr
    # an index without objects says how to make them
    plain = tmp_path / "plain"
    run("index", str(folder), "--index", str(plain), "--model", str(tiny_model), "-q", check=False)
    p = run("search", str(plain), q, "--objects", check=False)
    assert p.returncode == 2 and "--objects" in p.stderr and "Traceback" not in p.stderr


def test_http_object_search_point_box_and_jobs_keep_making_objects(tmp_path, embedder, tiny_model, sam_dir):
    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings

    folder = tmp_path / "photos"
    folder.mkdir()
    extra = tmp_path / "more"
    extra.mkdir()
    for i, p in enumerate(sample_photos(1)[:8]):
        shutil.copy(p, (folder if i < 6 else extra) / p.name)
    seg = Segmenter(SegmenterConfig(model=str(sam_dir), **LOOSE), device=torch.device("cpu"))
    idx = tmp_path / "idx"
    index_folder(folder, idx, embedder, CFG, segmenter=seg)
    token = "t0ken-for-the-tests-0123456789"
    settings = Settings(index=idx, token=token, model=str(tiny_model), device="cpu", workers=0)
    q = (folder / sorted(p.name for p in folder.iterdir())[2]).read_bytes()
    with local_client(create_app(settings)) as client:
        s = client.get("/stats").json()
        assert s["segmenter"] == str(sam_dir) and s["objects"] == Engine(idx).object_count() > 0
        for params in ({"objects": "true"}, {"point": "40,30"}, {"objects": "true", "box": "5,5,150,100"}):
            r = client.post("/search", params={"k": 4} | params, files={"image": ("q.jpg", q, "image/jpeg")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["mode"] == "objects" and len(body["results"]) == 4
            assert len({x["id"] for x in body["results"]}) == 4
            assert all(x["object_id"] // MAX_OBJECTS == x["id"] and rle_decode(x["mask"]).any() for x in body["results"])
            qo = body["query_object"]
            w, h = body["query_size"]
            assert 0 <= qo["box"][0] < qo["box"][2] <= w and 0 <= qo["box"][1] < qo["box"][3] <= h
        r = client.post("/search", params={"point": "9000,1"}, files={"image": ("q.jpg", q, "image/jpeg")})
        assert r.status_code == 422 and "outside" in r.json()["detail"]
        r = client.post("/search", params={"point": "x"}, files={"image": ("q.jpg", q, "image/jpeg")})
        assert r.status_code == 422
        by_id = client.get("/photos/2/similar", params={"objects": "true", "k": 3}).json()
        assert by_id["mode"] == "objects" and by_id["results"][0]["id"] == 2 and by_id["results"][0]["score"] > 0.999
        objs = client.get("/photos/2/objects").json()
        assert objs and all(rle_decode(o["mask"]).shape == (Engine(idx).photo_size([2])[2][1], Engine(idx).photo_size([2])[2][0])
                            for o in objs)
        assert client.get("/photos/999/objects").status_code == 404
        # a job on the server gives its new photos objects, with the index's own SAM settings
        job = client.post("/index/jobs", json={"folder": str(extra)}, headers={"Authorization": f"Bearer {token}"}).json()
        for _ in range(600):
            state = client.get(f"/index/jobs/{job['id']}").json()
            if state["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
        assert state["state"] == "done" and state["indexed"] == 2, state
        new = Engine(idx)
        assert len(new.objects_of([7, 8])) == 2 and verify(idx).ok
    plain = tmp_path / "plain"
    index_folder(folder, plain, embedder, CFG)
    with local_client(create_app(Settings(index=plain, model=str(tiny_model), device="cpu", workers=0))) as client:
        r = client.post("/search", params={"objects": "true"}, files={"image": ("q.jpg", q, "image/jpeg")})
        assert r.status_code == 400 and "--objects" in r.json()["detail"]


def test_offline_sam_id_names_the_sam_flag(monkeypatch):
    from indexer.errors import WeightsUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="facebook/sam-vit-base.*pass --sam-model DIR") as e:
        Segmenter(SegmenterConfig(), device=torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_relative_sam_directory_is_recorded_absolute(sam_dir, monkeypatch):
    monkeypatch.chdir(sam_dir.parent)
    seg = Segmenter(SegmenterConfig(model=sam_dir.name), device=torch.device("cpu"))
    assert seg.config.model == str(sam_dir)
