"""Region search by late interaction, localisation, parts — on a real index built from real photos."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from indexer.runner import IndexConfig, index_folder
from search import Engine
from search.region import BadRegion, box_to_mask, late_interaction, localize, pixel_mask_to_grid

CFG = IndexConfig(batch_size=16, workers=0, progress=False)
S = 448  # composite photos: 448 px -> 28 px per cell of the 16x16 grid
PASTE = (28, 308, 140, 420)  # where A's region lands in the composite


def test_box_to_mask_hand_cases():
    m = box_to_mask((0, 0, 50, 50), (100, 100), 4)  # centres at 12.5, 37.5, 62.5, 87.5
    assert m.sum() == 4 and m[:2, :2].all()
    m = box_to_mask((40, 40, 41, 41), (100, 100), 4)  # smaller than a cell -> the cell under its centre
    assert m.sum() == 1 and m[1, 1]
    with pytest.raises(BadRegion, match="empty"):
        box_to_mask((10, 10, 5, 20), (100, 100), 4)
    with pytest.raises(BadRegion, match="outside"):
        box_to_mask((200, 200, 300, 300), (100, 100), 4)


def test_pixel_mask_and_localize_hand_cases():
    pm = np.zeros((80, 80), np.uint8)
    pm[40:, :20] = 255
    assert pixel_mask_to_grid(pm, 4).tolist() == [[False] * 4, [False] * 4, [True, False, False, False], [True, False, False, False]]
    with pytest.raises(BadRegion):
        pixel_mask_to_grid(np.zeros((8, 8)), 4)
    # two query patches that best match cells 5 and 6 of a 4x4 grid; a weak third is ignored
    sim = np.full((4, 16), 0.1)
    sim[0, 5], sim[1, 6], sim[2, 6], sim[3, 15] = 0.9, 0.8, 0.85, 0.2
    score, s = late_interaction(np.eye(4, 3), np.eye(16, 3))
    assert s.shape == (4, 16) and score == pytest.approx(0.75)
    box, heat = localize(sim, 4, (400, 200))
    assert box == (100, 50, 300, 100) and heat[1, 1] == pytest.approx(0.9)


def _square(path) -> Image.Image:
    return Image.open(path).convert("RGB").resize((S, S), Image.Resampling.BICUBIC)


@pytest.fixture
def composite_index(photos, embedder, tmp_path):
    """Photo A, a composite holding A's region elsewhere, and A with that region erased."""
    files = sorted(photos.rglob("*.jpg"))
    a, b = _square(files[6]), _square(files[30])
    src = (168, 140, 280, 252)  # the middle of A (the object, not plain background): cells rows 5..8, cols 6..9
    region = a.crop(src)
    comp = b.copy()
    comp.paste(region, PASTE[:2])  # cells rows 11..14, cols 1..4 of B
    erased = a.copy()
    erased.paste((128, 128, 128), src)
    folder = tmp_path / "composites"
    folder.mkdir()
    a.save(folder / "a.png")
    comp.save(folder / "composite.png")
    erased.save(folder / "a_erased.png")
    for f in files[:21]:
        if f != files[6]:  # A's original would contain the region too
            shutil.copy(f, folder / f.name)
    idx = tmp_path / "idx"
    index_folder(folder, idx, embedder, CFG)
    return Engine(idx, embedder=embedder), folder, src


def test_region_found_elsewhere_and_not_fooled_by_whole_photo_likeness(composite_index):
    engine, folder, src = composite_index
    hits = engine.region(str(folder / "a.png"), k=len(engine), box=src, candidates=len(engine))
    names = [h.path.rsplit("/", 1)[1] for h in hits]
    assert names[:2] == ["a.png", "composite.png"]
    assert names.index("a_erased.png") > 1
    assert [h.photo_id for h in engine.region(str(folder / "a.png"), k=2, box=src)] == [h.photo_id for h in hits[:2]]
    comp = hits[names.index("composite.png")]
    x0, y0, x1, y1 = comp.box
    px0, py0, px1, py1 = PASTE
    inter = max(0, min(x1, px1) - max(x0, px0)) * max(0, min(y1, py1) - max(y0, py0))
    union = (x1 - x0) * (y1 - y0) + 112 * 112 - inter
    assert inter / union >= 0.5, comp.box
    assert comp.heat.shape == (16, 16) and np.unravel_index(comp.heat.argmax(), comp.heat.shape)[0] in range(11, 15)
    # the global search prefers the erased copy: that is what region search is for
    glob = [h.path.rsplit("/", 1)[1] for h in engine.similar(str(folder / "a.png"), k=len(engine))]
    assert glob.index("a_erased.png") < glob.index("composite.png")


def test_region_ranking_equals_brute_force_late_interaction(composite_index):
    engine, folder, src = composite_index
    n = len(engine)
    ids = np.array(sorted(engine.path_of(list(range(1, 100)))))
    xp = engine.photo_patches(ids)
    q, size = engine.query_patches(str(folder / "composite.png"))
    for box in [PASTE, (0, 0, 200, 120), (300, 10, 440, 440)]:
        xq = q[box_to_mask(box, size, 16)]
        exact = np.array([late_interaction(xq, xp[j])[0] for j in range(len(ids))])
        order = ids[np.argsort(-exact, kind="stable")]
        everything = engine.region(str(folder / "composite.png"), k=n, box=box, candidates=n)
        assert [h.photo_id for h in everything] == order.tolist()
        assert np.allclose([h.score for h in everything], np.minimum(np.sort(exact)[::-1], 1.0), atol=1e-5)  # reported as a cosine (<= 1)
        ann = engine.region(str(folder / "composite.png"), k=3, box=box)
        assert [h.photo_id for h in ann] == order[:3].tolist()


def test_region_by_mask_and_by_id_and_filters(composite_index):
    engine, folder, src = composite_index
    by_path = engine.region(str(folder / "a.png"), k=5, box=src)
    a_id = by_path[0].photo_id
    by_id = engine.region(a_id, k=5, box=src)
    assert [h.photo_id for h in by_id][:2] == [h.photo_id for h in by_path][:2]
    pm = np.zeros((S, S), np.uint8)
    pm[140:252, 168:280] = 1
    by_mask = engine.region(str(folder / "a.png"), k=5, mask=pm)
    assert [h.photo_id for h in by_mask] == [h.photo_id for h in by_path]
    only = engine.region(str(folder / "a.png"), k=5, box=src, allowed={2, 5})
    assert {h.photo_id for h in only} <= {2, 5} and len(only) == 2
    with pytest.raises(BadRegion):
        engine.region(a_id, box=src, mask=pm)


def test_parts_of_a_photo_and_as_region_query(composite_index, tmp_path):
    engine, folder, _ = composite_index
    img = np.zeros((S, S, 3), np.uint8)
    img[:, : S // 2] = (220, 30, 30)
    img[:, S // 2 :] = (20, 40, 200)
    rng = np.random.default_rng(0)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "halves.png")
    parts = engine.parts(str(tmp_path / "halves.png"), k=2)
    left, right = parts.labels[:, :7], parts.labels[:, 9:]
    assert len(set(left.ravel())) == 1 and len(set(right.ravel())) == 1 and left[0, 0] != right[0, 0]
    assert parts.size == (S, S) and parts.centers.shape == (2, 32)
    parts5 = engine.parts(str(folder / "composite.png"), k=5)
    assert parts5.labels.shape == (16, 16) and set(np.unique(parts5.labels)) == set(range(5))
    hits = engine.region(str(folder / "composite.png"), k=3, mask=parts5.labels == parts5.labels[12, 2])
    assert hits[0].path.endswith("composite.png")


def test_collection_parts(composite_index):
    engine, _, _ = composite_index
    parts = engine.collection_parts(k=8, per_part=3)
    assert len(parts) == 8 and sum(p.size for p in parts) == len(engine) * 256
    for p in parts:
        counts = [ph.patches for ph in p.photos]
        assert counts == sorted(counts, reverse=True) and 1 <= len(counts) <= 3
        x0, y0, x1, y1 = p.photos[0].box
        assert 0 <= x0 < x1 and 0 <= y0 < y1


def test_collection_part_is_a_region_query(composite_index):
    engine, _, _ = composite_index
    ids = np.array(sorted(engine.path_of(list(range(1, 100)))))
    xp = engine.photo_patches(ids)
    for p in engine.collection_parts(k=6, per_part=3)[:3]:
        hits = engine.region_by_vectors(p.center[None], 3, candidates=len(engine))
        exact = (xp @ p.center).max(1)  # best patch of each photo against the part's centre
        assert [h.photo_id for h in hits] == ids[np.argsort(-exact, kind="stable")[:3]].tolist()
        assert hits[0].score == pytest.approx(min(exact.max(), 1.0), abs=1e-5)
