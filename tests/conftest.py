"""Shared fixtures: a tiny random-weight DINOv2 saved to disk and loaded by path, and real photos."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the hub

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "caltech101-sample" / "images"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from indexer.testing import save_random_model

    return save_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def embedder(tiny_model):
    from indexer.embedder import Embedder, EmbedderConfig

    return Embedder(EmbedderConfig(model=str(tiny_model), device="cpu"))


def sample_photos(n_per_class: int = 2) -> list[Path]:
    """n photos of each of the 24 categories of the Caltech-101 sample, sorted."""
    by_class: dict[str, list[Path]] = {}
    for p in sorted(SAMPLE.glob("*.jpg")):
        by_class.setdefault(p.name.split("__")[0], []).append(p)
    return [p for ps in by_class.values() for p in ps[:n_per_class]]


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of 48 real photos (2 per category), in a subfolder to exercise recursion."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, p in enumerate(sample_photos(2)):
        shutil.copy(p, root / ("sub" if i % 3 == 0 else "") / p.name)
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yields (base url, port)."""
    import threading
    import time

    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        srv.should_exit = True
        t.join(10)


def need(module: str, what: str) -> None:
    """Skip without an optional package on a developer machine; under CI (which installs it) fail instead."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is missing: `make setup` installs {what}")
        pytest.skip(f"{module} is not installed ({what})")


def local_client(app, **kw):
    """FastAPI's test client, sending Host 127.0.0.1 as a browser on this machine does (the app answers only
    the Host names of its bind address, against DNS rebinding; the client's default 'testserver' is not one)."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1", **kw)
