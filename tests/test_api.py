"""Every HTTP route through FastAPI's test client, on a real index and the real (tiny) model."""

from __future__ import annotations

import io
import time

import pytest
from conftest import local_client
from PIL import Image

from api.app import create_app
from api.settings import Settings
from indexer.errors import ConfigError
from indexer.runner import IndexConfig, index_folder
from indexer.testing import save_random_model

TOKEN = "t0ken-for-the-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def served(photos, embedder, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    settings = Settings(index=idx, token=TOKEN, max_upload_bytes=2 * 2**20, model=str(tiny_model), device="cpu", workers=0)
    with local_client(create_app(settings)) as client:
        yield client, photos


def jpeg(path, scale: float = 1.0) -> bytes:
    img = Image.open(path).convert("RGB")
    img = img.resize((int(img.width * scale), int(img.height * scale)))
    b = io.BytesIO()
    img.save(b, "JPEG", quality=80)
    return b.getvalue()


def test_health_stats_docs(served):
    client, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    s = client.get("/stats").json()
    assert s["photos_indexed"] == 48 and s["grid"] == 16 and s["patch_kind"] == "SQ8"
    assert s["max_k"] == 1000 and client.get("/photos/1/similar", params={"k": s["max_k"] + 1}).status_code == 422
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    assert "box drawing" in client.get("/static/app.js").text and "http" not in page.text.replace("http://www.w3.org", "")


def test_search_by_upload_global_and_region(served):
    client, photos = served
    q = sorted(photos.rglob("*.jpg"))[5]
    r = client.post("/search", files={"image": ("q.jpg", jpeg(q, 0.8), "image/jpeg")}, params={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "global" and len(body["results"]) == 5 and body["results"][0]["path"] == q.name
    w, h = body["query_size"]
    r = client.post("/search", files={"image": ("q.jpg", jpeg(q), "image/jpeg")}, params={"k": 3, "box": f"0,0,{w // 2},{h // 2}"})
    body = r.json()
    assert body["mode"] == "region" and body["results"][0]["path"] == q.name
    top = body["results"][0]
    assert len(top["box"]) == 4 and len(top["heat"]) == 16 and top["width"] > 0


def test_search_by_id_box_part_and_parts(served):
    client, _ = served
    r = client.get("/photos/7/similar", params={"k": 4})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 7
    r = client.get("/photos/7/similar", params={"k": 4, "box": "0,0,80,80"})
    assert r.json()["mode"] == "region" and r.json()["results"][0]["box"] is not None
    r = client.get("/photos/7/similar", params={"k": 4, "part": 1, "parts_k": 3})
    assert r.status_code == 200 and r.json()["mode"] == "region"
    p = client.get("/photos/7/parts", params={"k": 4}).json()
    assert p["grid"] == 16 and {v for row in p["labels"] for v in row} == {0, 1, 2, 3}
    cp = client.get("/parts", params={"k": 4}).json()
    assert len(cp) == 4 and sum(c["patches"] for c in cp) == 48 * 256


def test_parts_of_an_upload(served):
    client, photos = served
    q = sorted(photos.rglob("*.jpg"))[3]
    p = client.post("/parts", files={"image": ("q.jpg", jpeg(q), "image/jpeg")}, params={"k": 3}).json()
    assert p["k"] == 3 and len(p["labels"]) == 16


def test_photo_and_thumbnail_are_served_by_id_only(served):
    client, photos = served
    path = client.get("/photos/7/similar", params={"k": 1}).json()["results"][0]["path"]
    original = next(p for p in photos.rglob(path))
    r = client.get("/photos/7")
    assert r.status_code == 200 and r.content == original.read_bytes()
    t = client.get("/photos/7/thumb", params={"size": 64})
    assert t.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(t.content)).size) <= 64
    for bad in ["/photos/..%2F..%2Fetc%2Fpasswd", "/photos/0", "/photos/-3/thumb", "/photos/abc/similar"]:
        assert client.get(bad).status_code in (404, 422), bad
    assert client.get("/photos/999").status_code == 404
    assert "not in the index" in client.get("/photos/999/similar").json()["detail"]


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"not an image at all", 415, "not an image"),
        (b"", 400, "empty upload"),
        (None, 400, "corrupt or truncated"),  # a real JPEG cut at a third
    ],
)
def test_upload_errors_are_clear_json(served, data, status, words):
    client, photos = served
    if data is None:
        whole = jpeg(sorted(photos.rglob("*.jpg"))[0])
        data = whole[: len(whole) // 3]
    r = client.post("/search", files={"image": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == status and words in r.json()["detail"]
    assert client.get("/health").status_code == 200


def test_limits_and_bad_parameters(served):
    client, photos = served
    big = b"\xff" * (3 * 2**20)
    r = client.post("/search", files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def stream():  # no Content-Length: refused while streaming, not after
        for _ in range(64):
            yield b"\xff" * 65536

    r = client.post("/search", content=stream(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    just_under = b"\xff" * (2 * 2**20 - 10)  # under the upload limit but not an image
    assert client.post("/search", files={"image": ("x.jpg", just_under, "image/jpeg")}).status_code == 415
    q = jpeg(sorted(photos.rglob("*.jpg"))[0])
    for params, words in [({"box": "1,2,3"}, "x0,y0,x1,y1"), ({"box": "50,50,10,10"}, "empty"), ({"box": "9000,9000,9100,9100"}, "outside")]:
        r = client.post("/search", files={"image": ("q.jpg", q, "image/jpeg")}, params=params)
        assert r.status_code == 422 and words in r.json()["detail"], params
    assert client.get("/photos/1/similar", params={"k": 0}).status_code == 422
    assert client.get("/photos/1/similar", params={"k": 10**6}).status_code == 422
    assert client.post("/search").status_code == 422  # no image field


def test_write_routes_need_the_token_and_work_with_it(served, tmp_path):
    client, photos = served
    assert client.delete("/photos/3").status_code == 401
    assert client.delete("/photos/3", headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}).status_code == 401
    assert client.post("/index/jobs", json={"folder": str(photos)}).status_code == 401
    r = client.delete("/photos/3", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"id": 3, "deleted": True}
    assert 3 not in [h["id"] for h in client.get("/photos/4/similar", params={"k": 100}).json()["results"]]
    assert client.delete("/photos/3", headers=AUTH).status_code == 404
    # add a folder as a background job; searches are answered meanwhile and see the photos once committed
    extra = tmp_path / "extra"
    extra.mkdir()
    src = sorted(photos.rglob("*.jpg"))[:5]
    for i, p in enumerate(src):
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(extra / f"flipped{i}.jpg")
    assert client.post("/index/jobs", json={"folder": str(tmp_path / "nope")}, headers=AUTH).status_code == 422
    job = client.post("/index/jobs", json={"folder": str(extra)}, headers=AUTH)
    assert job.status_code == 202
    jid = job.json()["id"]
    deadline = time.time() + 120
    while (j := client.get(f"/index/jobs/{jid}").json())["state"] not in ("done", "failed"):
        assert (j["state"], j["stage"]) in {("queued", None), ("running", "scanning"), ("running", "indexing")}, j
        assert client.get("/photos/4/similar", params={"k": 3}).status_code == 200
        assert time.time() < deadline
        time.sleep(0.2)
    assert j["state"] == "done" and j["indexed"] == 5 and j["total"] == 5 and j["stage"] is None
    assert client.get("/stats").json()["photos_indexed"] == 52
    r = client.post("/search", files={"image": ("q.jpg", (extra / "flipped2.jpg").read_bytes(), "image/jpeg")}, params={"k": 1})
    assert r.json()["results"][0]["path"] == "flipped2.jpg"
    assert client.get("/index/jobs/99").status_code == 404


def test_write_routes_disabled_without_a_token(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    with local_client(create_app(Settings(index=idx, token=None, device="cpu"))) as client:
        r = client.delete("/photos/1", headers=AUTH)
        assert r.status_code == 403 and "DINOSEARCH_TOKEN" in r.json()["detail"]
    with pytest.raises(ConfigError, match="at least 16"):
        Settings(index=idx, token="short")


def test_model_mismatch_is_409_and_empty_index_503(photos, embedder, tmp_path):
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    other = save_random_model(tmp_path / "other", "tiny", seed=3)
    with local_client(create_app(Settings(index=idx, model=str(other), device="cpu"))) as client:
        r = client.get("/photos/1/similar")
        assert r.status_code == 409 and "embeds differently" in r.json()["detail"]
        assert client.get("/health").status_code == 200
    with local_client(create_app(Settings(index=tmp_path / "new", device="cpu"))) as client:
        r = client.get("/stats")
        assert r.status_code == 503 and "add photos first" in r.json()["detail"]


def test_label_filter_and_labels_route(photos, embedder, tmp_path):
    import torch

    from indexer.classifier import Classifier, ClassifierConfig
    from indexer.testing import save_random_classifier

    clf = Classifier(ClassifierConfig(model=str(save_random_classifier(tmp_path / "vit", ["cat", "dog", "boat"]))),
                     device=torch.device("cpu"))
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False), classifier=clf)
    with local_client(create_app(Settings(index=idx, device="cpu"))) as client:
        counts = client.get("/labels").json()
        assert sum(c["photos"] for c in counts) == 48 and {c["label"] for c in counts} <= {"cat", "dog", "boat"}
        label = counts[0]["label"]
        r = client.get("/photos/1/similar", params={"k": 48, "label": label}).json()["results"]
        tagged = {i for (i,) in client.app.state.service.engine.db.execute(
            "SELECT photo_id FROM labels WHERE label=?", (label,))}
        assert r and {x["id"] for x in r} == tagged
        assert client.get("/photos/1/similar", params={"label": "x" * 201}).status_code == 422


def test_the_page_and_the_docs_name_no_outside_address(served):
    """Offline means every file the page loads, and the /docs and /redoc pages, name only this server."""
    import re
    from pathlib import Path

    client, _ = served
    static = Path(__file__).resolve().parents[1] / "api" / "static"
    served_files = ["/", "/docs", "/redoc"] + [f"/static/{p.name}" for p in sorted(static.iterdir()) if p.is_file()]
    assert len(served_files) >= 6
    for url in served_files:
        r = client.get(url)
        assert r.status_code == 200, url
        outside = [u for u in re.findall(r"https?://[^\s\"'<>)]+", r.text) if not u.startswith("http://127.0.0.1")]
        assert outside == [], (url, outside)
    docs = client.get("/docs").text
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs and "/static-offline-docs/redoc.standalone.js" in client.get("/redoc").text
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200


def test_one_photo_s_details(served):
    """GET /photos/{id}/info: the row GET /photos lists for it, with its tags; unknown ids are 404."""
    client, _ = served
    listed = {p["id"]: p for p in client.get("/photos", params={"limit": 100}).json()["photos"]}
    info = client.get("/photos/7/info")
    assert info.status_code == 200
    body = info.json()
    assert body.pop("tags") == [] and body == listed[7]  # this index has no classifier
    assert client.get("/photos/99999/info").status_code == 404
    client.delete("/photos/7", headers=AUTH)
    assert client.get("/photos/7/info").status_code == 404
