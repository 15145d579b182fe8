"""Duplicates: candidates, patch-grid verification, groups, keepers, moves — on a real index of real photos and
edited copies made by Pillow (tiny random-weight DINOv2, real FAISS, real SQLite)."""

from __future__ import annotations

import json
import os
import re
import shutil

import faiss
import numpy as np
import pytest
from conftest import sample_photos
from PIL import Image, ImageOps

from api.cli import main
from indexer.runner import IndexConfig, index_folder
from search import Engine
from search.duplicates import (
    DuplicateConfig,
    _Finder,
    candidate_pairs,
    duplicates_of,
    find_duplicates,
    find_links,
    move_copies,
    undo_moves,
    verify,
    verify_pairs,
)

CFG = IndexConfig(batch_size=16, workers=0, progress=False)


def make_family(folder, src) -> dict[str, str]:
    """Copies of one photo: the same pixels in other files, and edits of the same shot."""
    folder.mkdir(parents=True, exist_ok=True)
    a = Image.open(src).convert("RGB")
    w, h = a.size
    shutil.copy(src, folder / "copy.jpg")  # the same bytes
    a.save(folder / "same.png")  # the same decoded pixels, another format
    rgba = a.convert("RGBA")
    rgba.save(folder / "alpha.png")  # an (opaque) alpha channel
    ex = Image.Exif()
    ex[0x0112] = 6  # stored rotated, displayed upright: the same pixels after EXIF orientation
    a.transpose(Image.Transpose.ROTATE_90).save(folder / "exif.png", exif=ex)
    a.resize((w // 2, h // 2), Image.Resampling.LANCZOS).save(folder / "half.jpg", quality=90)
    ImageOps.mirror(a).save(folder / "mirror.jpg", quality=95)
    return {n: str(folder / n) for n in ("copy.jpg", "same.png", "alpha.png", "exif.png", "half.jpg", "mirror.jpg")}


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("dups")
    photos = root / "photos"
    photos.mkdir()
    src = sample_photos(1)[:16]
    for p in src:
        shutil.copy(p, photos / p.name)
    fam = make_family(photos / "family", src[0])
    index_folder(photos, root / "idx", embedder, CFG)
    return root / "idx", str(photos / src[0].name), fam


def by_path(engine) -> dict[str, int]:
    return {os.fsdecode(p): i for i, p in engine.db.execute("SELECT id, path FROM photos")}


def test_family_is_one_group_with_its_relations(dup_index):
    idx, original, fam = dup_index
    e = Engine(idx)
    ids = by_path(e)
    groups = find_duplicates(e)
    family = {ids[original], *(ids[p] for p in fam.values())}
    holding = [g for g in groups if family & {m.photo.id for m in g.members}]
    assert len(holding) == 1 and {m.photo.id for m in holding[0].members} == family  # no stranger joins it
    g = holding[0]
    rel = {m.photo.path: m for m in g.members}
    assert g.keep in (ids[original], ids[fam["copy.jpg"]], ids[fam["same.png"]], ids[fam["alpha.png"]], ids[fam["exif.png"]])
    assert "most pixels" in g.reasons[0]
    for name in ("copy.jpg", "same.png", "alpha.png", "exif.png"):  # same pixels after decode and EXIF orientation
        assert rel[fam[name]].relation in ("exact", "keep"), name
    assert rel[fam["half.jpg"]].relation == "edited"
    assert rel[fam["mirror.jpg"]].transform == "mirror"  # verified through the flipped grid
    assert g.kind == "edited"  # the weakest relation to the kept photo
    assert not [g for g in groups if g is not holding[0]]  # random weights: no other group among unrelated photos


def test_exact_and_kind_filter(dup_index):
    idx, original, fam = dup_index
    e = Engine(idx)
    assert find_duplicates(e, DuplicateConfig(kind="similar")) == []
    assert all(g.kind == "edited" for g in find_duplicates(e, DuplicateConfig(kind="edited")))


def test_duplicates_of_one_photo(dup_index):
    idx, original, fam = dup_index
    e = Engine(idx)
    ids = by_path(e)
    links = duplicates_of(e, ids[fam["mirror.jpg"]])
    others = {lk.a if lk.b == ids[fam["mirror.jpg"]] else lk.b for lk in links}
    assert ids[original] in others and all(lk.match.transform == "mirror" for lk in links if lk.match)


def test_verify_recovers_crops_and_symmetries():
    """A synthetic patch grid (distinct random vectors per cell) against its crop-resized, mirrored and rotated copies."""
    g, d = 16, 64
    rng = np.random.default_rng(0)
    big = rng.standard_normal((32, 32, d)).astype(np.float32)  # a scene at twice the grid's detail
    a = big.reshape(16, 2, 16, 2, d).mean((1, 3))  # the whole scene at 16x16
    crop = big[8:24, 8:24]  # its middle half, enlarged to the full grid
    for name, b, want in (("crop", crop, "none"), ("mirror", a[:, ::-1], "mirror"), ("rot90", np.rot90(a, 1), None)):
        xa, xb = a.reshape(-1, d).copy(), np.ascontiguousarray(b).reshape(-1, d).copy()
        faiss.normalize_L2(xa)
        faiss.normalize_L2(xb)
        m = verify(xa, xb, g)
        assert m is not None and m.score > 0.6, name
        if want:
            assert m.transform == want, (name, m)
        if name == "crop":
            assert m.scale == pytest.approx((2.0, 2.0), abs=0.2) and m.cells_a[0] in (3, 4, 5) and m.cells_a[2] in (11, 12, 13)
        if name == "rot90":
            assert m.transform.startswith("rotate")
    other = rng.standard_normal((g * g, d)).astype(np.float32)
    faiss.normalize_L2(other)
    xa = a.reshape(-1, d).copy()
    faiss.normalize_L2(xa)
    assert verify(xa, other, g) is None or verify(xa, other, g).score < 0.3


def test_verify_pairs_is_verify_of_each_pair(dup_index):
    """Batched verification (blocks of pairs on threads, the 8 symmetries scored as arrays) answers exactly what
    verify answers pair by pair, on real stored grids: the family's edits and unrelated photos."""
    idx, original, fam = dup_index
    e = Engine(idx)
    ids = sorted(by_path(e).values())
    xp = e.photo_patches(ids)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(ids), (2, 40))
    a[:len(fam)] = ids.index(by_path(e)[original])
    b[:len(fam)] = [ids.index(by_path(e)[p]) for p in fam.values()]
    g = e.manifest.grid
    one = [verify(xp[i], xp[j], g) for i, j in zip(a, b)]
    many = verify_pairs(xp[a], xp[b], g, block=3, workers=2)
    assert many == one and sum(m is not None and m.score >= 0.6 for m in one) >= len(fam) - 1


def test_each_grid_is_decoded_once_per_run(dup_index):
    idx, _, _ = dup_index
    e = Engine(idx)
    finder = _Finder(e, DuplicateConfig())
    links, photos = find_links(e, DuplicateConfig(), finder=finder, block=4)  # many blocks of pairs
    assert links and 0 < finder.decoded <= len(photos)  # each photo of a candidate pair once, however many pairs hold it


def test_join_finds_the_near_copies_brute_force_finds():
    """The clustered self-join (whole passes over large indexes) against brute force on planted near-copies."""
    rng = np.random.default_rng(2)
    xb = rng.standard_normal((6000, 32)).astype(np.float32)
    src, dst = rng.choice(6000, (2, 60), replace=False)
    xb[dst] = xb[src] + 0.05 * rng.standard_normal((60, 32)).astype(np.float32)
    faiss.normalize_L2(xb)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    ids = np.arange(6000, dtype=np.int64) * 3 + 1  # ids are not row numbers
    index.add_with_ids(xb, ids)
    pairs, cos = candidate_pairs(index, ids, xb, 4, 0.9, join=True)
    sim = xb @ xb.T
    np.fill_diagonal(sim, -1)
    a, b = np.nonzero(np.triu(sim >= 0.9))
    truth = {(int(ids[i]), int(ids[j])) for i, j in zip(a, b)}
    assert len(truth) >= 60 and truth <= {tuple(p) for p in pairs.tolist()}
    assert np.allclose(cos, [sim[(i - 1) // 3, (j - 1) // 3] for i, j in pairs], atol=1e-5) and (cos >= 0.9).all()


def test_candidate_pairs_match_brute_force():
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((500, 32)).astype(np.float32)
    xb[250:260] = xb[:10] + 0.05 * rng.standard_normal((10, 32)).astype(np.float32)  # planted near-copies
    faiss.normalize_L2(xb)
    ids = np.arange(1, 501, dtype=np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    index.add_with_ids(xb, ids)
    pairs, cos = candidate_pairs(index, ids, xb, 4, 0.9, batch=128)
    sim = xb @ xb.T
    truth = {(int(ids[i]), int(ids[j])) for i, j in zip(*np.nonzero(np.triu(sim, 1) >= 0.9))}
    assert {tuple(p) for p in pairs.tolist()} == truth and (cos >= 0.9).all()


def test_empty_and_one_photo_index(tmp_path, embedder, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sample_photos(1)[0], one)
    index_folder(one, tmp_path / "one.idx", embedder, CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    index_folder(empty, tmp_path / "empty.idx", embedder, CFG)
    for idx in (tmp_path / "one.idx", tmp_path / "empty.idx"):
        assert find_duplicates(Engine(idx)) == []
        assert main(["duplicates", str(idx)]) == 0
        assert "no duplicates" in capsys.readouterr().out
        assert main(["duplicates", str(idx), "--json", "--kind", "exact", "--threshold", "0.9"]) == 0
        assert json.loads(capsys.readouterr().out) == {"groups": []}


def test_deleted_photo_is_not_the_keeper_and_moves_undo(tmp_path, embedder, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    src = sample_photos(1)[0]
    big = Image.open(src).convert("RGB")
    big = big.resize((big.width * 2, big.height * 2), Image.Resampling.LANCZOS)
    big.save(photos / "big.jpg", quality=95)  # the one to keep: most pixels
    shutil.copy(src, photos / "a.jpg")
    shutil.copy(src, photos / "b.jpg")
    for p in sample_photos(1)[1:6]:
        shutil.copy(p, photos)
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    (photos / "big.jpg").unlink()  # deleted since indexing: never offered as the keeper
    groups = find_duplicates(Engine(idx))
    assert len(groups) == 1
    g = groups[0]
    kept = next(m for m in g.members if m.photo.id == g.keep)
    assert kept.photo.path.endswith(("a.jpg", "b.jpg")) and any("gone" in r for r in g.reasons)

    out = tmp_path / "moved"
    (out / "group-0001").mkdir(parents=True)
    other = "b.jpg" if kept.photo.path.endswith("a.jpg") else "a.jpg"
    (out / "group-0001" / other).write_bytes(b"already here")  # a name that must not be overwritten
    assert main(["duplicates", str(idx), "--move-to", str(out), "--json"]) == 0  # dry run
    plan = json.loads(capsys.readouterr().out)
    assert plan["moves"]["applied"] is False and len(plan["moves"]["moved"]) == 1 and (photos / other).exists()
    assert main(["duplicates", str(idx), "--move-to", str(out), "--apply"]) == 0
    text = capsys.readouterr().out
    assert "re-run `dinosearch index" in text and not (photos / other).exists()
    assert (out / "group-0001" / other).read_bytes() == b"already here"
    moved = out / "group-0001" / f"{other[0]} (1).jpg"
    assert moved.read_bytes() == (photos / kept.photo.path.rsplit("/", 1)[1]).read_bytes()
    assert len(list(out.glob("dinosearch-moves-*.jsonl"))) == 1
    assert main(["duplicates", str(idx), "--undo", str(out)]) == 0  # the folder: its newest manifest
    assert (photos / other).exists() and not moved.exists()


def test_move_goes_on_past_errors(tmp_path, embedder):
    photos = tmp_path / "p"
    photos.mkdir()
    src = sample_photos(1)[0]
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(src, photos / n)
    index_folder(photos, tmp_path / "idx", embedder, CFG)
    groups = find_duplicates(Engine(tmp_path / "idx"))
    assert [g.kind for g in groups] == ["exact"]
    victims = [m.photo for m in groups[0].members if m.photo.id != groups[0].keep]
    os.unlink(victims[0].path)  # gone between finding and moving: one error, the rest still moves
    rep = move_copies(groups, tmp_path / "out", apply=True)
    assert len(rep.moved) == 1 and len(rep.errors) == 1 and rep.errors[0][0] == victims[0].path
    undo = undo_moves(rep.manifest)
    assert len(undo.moved) == 1 and not undo.errors
    assert {p.name for p in photos.iterdir()} == {"a.jpg", "b.jpg", "c.jpg"} - {os.path.basename(victims[0].path)}


def test_http_routes(dup_index, tiny_model):
    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings

    idx, original, fam = dup_index
    ids = by_path(Engine(idx))
    settings = Settings(index=idx, model=str(tiny_model), device="cpu", workers=0)
    with local_client(create_app(settings)) as client:
        page = client.get("/duplicates", params={"limit": 1}).json()
        assert page["total"] == 1 and page["offset"] == 0 and len(page["groups"]) == 1
        g = page["groups"][0]
        assert g["kind"] == "edited" and len(g["photos"]) == 7 and "/" not in g["photos"][0]["path"]
        assert client.get("/duplicates", params={"kind": "exact"}).json()["total"] == 0
        assert client.get("/duplicates", params={"offset": 5}).json()["groups"] == []
        assert client.get("/duplicates", params={"kind": "bogus"}).status_code == 422
        assert client.get("/duplicates", params={"threshold": 2}).status_code == 422
        mine = client.get(f"/photos/{ids[fam['copy.jpg']]}/duplicates").json()
        kinds = {d["id"]: d["kind"] for d in mine["duplicates"]}
        assert kinds[ids[original]] == "exact" and kinds[ids[fam["same.png"]]] == "exact"
        assert ids[fam["mirror.jpg"]] in kinds
        assert client.get("/photos/999999/duplicates").status_code == 404


def test_bench_scale_stage_runs(tmp_path):
    """The benchmark's scale stage on a few vectors (the suite stage needs a dinov2-small: run by hand)."""
    import subprocess
    import sys

    from conftest import REPO

    p = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_duplicates.py"), "--skip-suite", "--vectors", "3000",
                        "--sample", "200", "--baseline", "200", "--kind", "IVF32,Flat", "--nprobe", "8"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "baseline, k-NN search per photo" in p.stdout and "candidate stage (clustered join" in p.stdout
    m = re.search(r"recall of planted pairs \(cosine >= [\d.]+\) ([\d.]+)", p.stdout)
    assert m and float(m[1]) >= 0.95, p.stdout


def test_index_check_duplicates_flags_only_what_was_added(tmp_path, tiny_model, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    src = sample_photos(1)[:8]
    for p in src:
        shutil.copy(p, photos / p.name)
    idx = tmp_path / "idx"
    flags = ["--index", str(idx), "--model", str(tiny_model), "--device", "cpu", "--workers", "0", "-q"]
    assert main(["index", str(photos), *flags, "--check-duplicates"]) == 0
    assert "0 new photo(s) duplicate indexed ones" in capsys.readouterr().out
    make_family(photos / "later", src[2])
    Image.open(src[5]).convert("RGB").save(photos / "later" / "resaved.png")
    assert main(["index", str(photos), *flags, "--check-duplicates"]) == 0
    out = capsys.readouterr().out
    assert "7 new photo(s) duplicate indexed ones" in out, out
    assert f"exact (1.00): {photos / 'later' / 'copy.jpg'} ~ {photos / src[2].name}" in out
    assert "mirror" in out and src[5].name in out


def test_api_job_checks_duplicates(tmp_path, tiny_model, embedder):
    import time

    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings

    photos = tmp_path / "photos"
    photos.mkdir()
    src = sample_photos(1)[:6]
    for p in src:
        shutil.copy(p, photos / p.name)
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, CFG)
    later = tmp_path / "later"
    later.mkdir()
    shutil.copy(src[3], later / "again.jpg")
    token = "t0ken-for-the-tests-0123456789"
    settings = Settings(index=idx, token=token, model=str(tiny_model), device="cpu", workers=0)
    with local_client(create_app(settings)) as client:
        r = client.post("/index/jobs", json={"folder": str(later), "check_duplicates": True},
                        headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 202, r.text
        for _ in range(600):
            job = client.get(f"/index/jobs/{r.json()['id']}").json()
            if job["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        assert job["state"] == "done", job
        ids = by_path(Engine(idx))
        assert job["duplicates"] == [{"id": ids[str(later / "again.jpg")], "duplicate_of": ids[str(photos / src[3].name)],
                                      "kind": "exact", "score": 1.0}]


def test_ivf_global_index_and_parseable_outputs(tmp_path, embedder, capsys):
    import csv
    import io

    photos = tmp_path / "photos"
    photos.mkdir()
    src = sample_photos(1)[:10]
    for p in src:
        shutil.copy(p, photos / p.name)
    Image.open(src[4]).convert("RGB").save(photos / "same.png")
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(batch_size=16, workers=0, progress=False, global_kind="IVF4,Flat"))
    e = Engine(idx)
    ivf = e.global_index.ivf_parts()[0]  # the forced kind, trained on the run's one segment
    before = ivf.nprobe
    groups = find_duplicates(e, DuplicateConfig(nprobe=4))  # every list probed: the pair cannot be missed
    assert ivf.nprobe == before  # the searches' own setting is left alone
    assert [(g.kind, sorted(os.path.basename(m.photo.path) for m in g.members)) for g in groups] == [
        ("exact", sorted([src[4].name, "same.png"]))]
    assert main(["duplicates", str(idx), "--csv", "--move-to", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))  # the dry run's lines went to stderr
    assert len(rows) == 2 and {r["kind"] for r in rows} == {"exact"}
    assert main(["duplicates", str(idx), "--json", "--csv", "--move-to", str(tmp_path / "out"), "--apply"]) == 0
    moved = json.loads(capsys.readouterr().out)["moves"]
    assert len(moved["moved"]) == 1 and moved["applied"]
    assert main(["duplicates", str(idx), "--undo", str(tmp_path / "out"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["moved"]) == 1


def test_a_chain_of_similar_links_cannot_merge_everything():
    from search.duplicates import Link, group_links

    chain = [Link(i, i + 1, "similar", 0.5 - i / 100, None, 0.9) for i in range(1, 10)]  # 1~2~3~...~10, each only to the next
    groups = group_links(chain)
    assert all(len(g) == 2 for g in groups) and len(groups) == 5  # pairs, never one group of ten
    edits = [Link(i, i + 1, "edited", 0.7, None, 0.9) for i in range(1, 10)]  # an edit of an edit is the same shot
    assert group_links(edits) == [list(range(1, 11))]
    tri = [Link(1, 2, "similar", 0.5, None, 0.9), Link(2, 3, "similar", 0.45, None, 0.9), Link(1, 3, "similar", 0.4, None, 0.9)]
    assert group_links(tri) == [[1, 2, 3]]  # every cross pair linked: one burst


def test_keeper_ties_broken_by_the_exif_the_catalog_read(tmp_path, embedder):
    """Two same-pixel copies: the one whose header carries a date, camera and place is kept (from the catalog's meta)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    src = Image.open(sample_photos(1)[5]).convert("RGB")
    src.save(folder / "a_plain.png")
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0132] = "Leica", "M11", "2023:05:01 10:00:00"
    src.save(folder / "b_camera.png", exif=ex)
    os.utime(folder / "b_camera.png", ns=(10**18, 10**18))  # newer on disk: "oldest" would pick the plain one
    idx = tmp_path / "idx"
    index_folder(folder, idx, embedder, CFG)
    groups = find_duplicates(Engine(idx, embedder=embedder))
    assert len(groups) == 1 and groups[0].kind == "exact"
    kept = next(m.photo for m in groups[0].members if m.photo.id == groups[0].keep)
    assert kept.path.endswith("b_camera.png") and kept.exif >= 3 and any("EXIF" in r for r in groups[0].reasons)


def test_http_move_of_reviewed_copies(tmp_path, tiny_model, embedder):
    """POST /duplicates/move: token-guarded, a dry run first, the keeper a person chose stays, the rest moves into
    the folder (existing, absolute), never a photo of another group; the manifest undoes it."""
    from conftest import local_client

    from api.app import create_app
    from api.settings import Settings

    photos = tmp_path / "photos"
    photos.mkdir()
    src = sample_photos(1)[:6]
    for p in src:
        shutil.copy(p, photos / p.name)
    shutil.copy(src[0], photos / "copy.jpg")
    ImageOps.mirror(Image.open(src[0])).save(photos / "mirror.jpg", quality=85)
    idx, out = tmp_path / "idx", tmp_path / "out"
    out.mkdir()
    index_folder(photos, idx, embedder, CFG)
    token = "move-test-token-0123456789"
    with local_client(create_app(Settings(index=idx, model=str(tiny_model), device="cpu", workers=0, token=token))) as client:
        ids = {p["path"]: p["id"] for p in client.get("/photos").json()["photos"]}
        grouped = [{p["path"] for p in g["photos"]} for g in client.get("/duplicates").json()["groups"]]
        assert any({src[0].name, "copy.jpg", "mirror.jpg"} <= g for g in grouped)
        assert not any(src[3].name in g for g in grouped)
        group = {"keep": ids["mirror.jpg"], "photos": [ids[src[0].name], ids["copy.jpg"], ids["mirror.jpg"]]}
        body = {"folder": str(out), "groups": [group]}
        assert client.post("/duplicates/move", json=body).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        dry = client.post("/duplicates/move", json=body, headers=auth)
        assert dry.status_code == 200, dry.text
        d = dry.json()
        assert d["applied"] is False and d["manifest"] is None and not d["errors"]
        assert sorted(m["source"] for m in d["moved"]) == sorted([src[0].name, "copy.jpg"])
        assert all(m["to"].startswith("group-0001/") for m in d["moved"]) and not list(out.iterdir())
        # bad requests: one sentence each, nothing moved
        for bad, code in [({**body, "folder": "relative/dir"}, 422), ({**body, "folder": str(tmp_path / "nope")}, 422),
                          ({**body, "groups": [{**group, "keep": ids[src[3].name]}]}, 422),
                          ({**body, "groups": [{"keep": ids[src[3].name], "photos": [ids[src[3].name], ids["copy.jpg"]]}]}, 422)]:
            r = client.post("/duplicates/move", json={**bad, "apply": True}, headers=auth)
            assert r.status_code == code and isinstance(r.json()["detail"], str), r.text
        assert (photos / "copy.jpg").exists() and not list(out.iterdir())
        done = client.post("/duplicates/move", json={**body, "apply": True}, headers=auth).json()
        assert done["applied"] and done["manifest"].startswith("dinosearch-moves-") and not done["errors"]
    assert (photos / "mirror.jpg").exists() and not (photos / "copy.jpg").exists() and not (photos / src[0].name).exists()
    assert sorted(p.name for p in (out / "group-0001").iterdir()) == sorted([src[0].name, "copy.jpg"])
    rep = undo_moves(out / done["manifest"])
    assert len(rep.moved) == 2 and (photos / "copy.jpg").exists() and (photos / src[0].name).exists()
