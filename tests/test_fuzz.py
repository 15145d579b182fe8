"""Property-based fuzzing of every route from the OpenAPI schema: schemathesis' CLI against a live
server on loopback; no generated input may give a 5xx, and the server must stay up."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import live_server, sample_photos

from api.app import create_app
from api.settings import Settings
from indexer.runner import IndexConfig, index_folder

ST = Path(sys.executable).parent / "st"


def test_no_generated_input_gives_a_server_error(embedder, tiny_model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sample_photos(1)[:12]:
        shutil.copy(p, photos / p.name)
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    # first a token is set but not sent: write routes must refuse, never crash (and never index '/');
    # then it is sent, with jobs confined to an empty folder: folder validation, deletes and cancels get fuzzed too
    jail = tmp_path / "jail"
    jail.mkdir()
    token = "fuzz-token-0123456789abcdef"
    app = create_app(Settings(index=idx, model=str(tiny_model), token=token, device="cpu", workers=0, allowed_roots=(jail,)))
    with live_server(app) as (url, _):  # schemathesis sends Host 127.0.0.1:PORT: the Host check is on
        operations = sum(len(v) for v in app.openapi()["paths"].values())
        assert operations >= 16
        for auth in ([], ["-H", f"Authorization: Bearer {token}"]):
            p = subprocess.run([str(ST), "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
                                "--max-examples", "25", "--workers", "1", "--no-color", *auth],
                               capture_output=True, text=True, timeout=900, cwd=tmp_path)
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
            assert f"Tested: {operations}" in p.stdout and " 0 passed" not in p.stdout  # every one exercised
            assert urllib.request.urlopen(f"{url}/health").status == 200
