"""The `dinosearch` command as a user runs it: subprocesses, exit codes, output, SIGKILL and resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sample_photos
from test_index import assert_consistent, catalog_rows

from indexer.snapshot import live_generation

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, env=ENV, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"dinosearch {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_index_search_info_json(photos, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    out = run("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q").stdout
    assert "48 indexed" in out and "0 failed" in out
    query = sorted(photos.rglob("*.jpg"))[4]
    hits = json.loads(run("search", str(idx), str(query), "-k", "3", "--json").stdout)
    assert len(hits) == 3 and hits[0]["path"] == str(query) and hits[0]["score"] > 0.999
    text = run("search", str(idx), str(hits[1]["id"]), "--id", "-k", "1").stdout
    assert text.split()[2] == hits[1]["path"]
    info = json.loads(run("info", str(idx), "--json").stdout)
    assert info["photos_indexed"] == 48 and info["global_vectors"] == 48 and info["patch_vectors"] == 48 * 256
    assert info["model"] == str(tiny_model) and info["precision"] in ("fp32", "bf16")
    # second run: nothing to do, and the model comes from the index
    assert "0 indexed" in run("index", str(photos), "--index", str(idx), "-q").stdout


def test_offline_hub_id_one_line_error(photos, tmp_path):
    p = run("index", str(photos), "--index", str(tmp_path / "idx"), "--model", "facebook/dinov2-small", check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinosearch: error: cannot load model 'facebook/dinov2-small'")
    assert "--model DIR" in lines[0]
    assert not (tmp_path / "idx").exists()


def test_clear_errors_for_missing_things(photos, tiny_model, tmp_path):
    p = run("search", str(tmp_path / "nothing"), "q.jpg", check=False)
    assert p.returncode == 2 and "no index at" in p.stderr and "Traceback" not in p.stderr
    p = run("index", str(tmp_path / "nope"), "--index", str(tmp_path / "i"), "--model", str(tiny_model), check=False)
    assert p.returncode == 2 and "not a folder" in p.stderr
    idx = tmp_path / "idx"
    run("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q")
    p = run("search", str(idx), str(tmp_path / "missing.jpg"), check=False)
    assert p.returncode == 2 and "query photo not found" in p.stderr
    (tmp_path / "bad.jpg").write_text("nope")
    p = run("search", str(idx), str(tmp_path / "bad.jpg"), check=False)
    assert p.returncode == 2 and "not an image" in p.stderr
    p = run("search", str(idx), "99999", "--id", check=False)
    assert p.returncode == 2 and "photo id 99999 is not in the index" in p.stderr
    p = run("index", str(photos), "--index", str(idx), "--resolution", "112", check=False)
    assert p.returncode == 2 and "built at 224px" in p.stderr


def _kill_and_resume(folder: Path, idx: Path, model: Path, trials: int, seed: int) -> int:
    """SIGKILL `dinosearch index` at random moments, re-running each time; returns how many kills landed mid-run."""
    rng = random.Random(seed)
    args = [sys.executable, "-m", "api.cli", "index", str(folder), "--index", str(idx), "--model", str(model),
            "-q", "--batch-size", "4", "--commit-every", "8", "--workers", "1"]
    killed = 0
    for _ in range(trials):
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 9.0))  # start-up takes ~2-3 s; kills land in load, scan, embed or commit
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait()
        if idx.exists() and live_generation(idx) is not None:
            assert_consistent(idx)
    final = subprocess.run(args, env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    return killed


def _crash_trial(tmp_path, tiny_model, trials: int, seed: int) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sample_photos(5):
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"garbage")
    clean = tmp_path / "clean"
    run("index", str(folder), "--index", str(clean), "--model", str(tiny_model), "-q")
    idx = tmp_path / "idx"
    killed = _kill_and_resume(folder, idx, tiny_model, trials, seed)
    assert killed >= 1
    assert catalog_rows(idx) == catalog_rows(clean)  # same ids, paths, statuses, hashes
    assert_consistent(idx)
    q = str(sorted(folder.glob("*.jpg"))[17])
    a = run("search", str(idx), q, "-k", "10", "--json").stdout
    b = run("search", str(clean), q, "-k", "10", "--json").stdout
    assert json.loads(a) == json.loads(b)
    assert not list(idx.glob("seg-*.tmp"))  # a killed commit's unfinished segment is removed by the next writer


def test_sigkill_then_resume_matches_a_clean_run(tmp_path, tiny_model):
    _crash_trial(tmp_path, tiny_model, trials=3, seed=1)


@pytest.mark.slow
def test_sigkill_many_trials(tmp_path, tiny_model):
    _crash_trial(tmp_path, tiny_model, trials=20, seed=2)


def test_bf16_cpu_default_path_end_to_end(photos, tiny_model, tmp_path):
    """The default path of a CPU with native bf16 (forced here): index, resume, search, info, serve all run in bf16,
    and the index keeps its precision on a machine that would choose otherwise."""
    bf16_cpu = {**ENV, "DINOSEARCH_CPU_BF16": "1"}
    idx = tmp_path / "idx"
    (photos / "broken.jpg").write_bytes(b"not a photo")

    def dino(*args, env=bf16_cpu, check=True):
        p = subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, env=env, timeout=600)
        assert not check or p.returncode == 0, p.stderr
        return p

    assert "48 indexed" in dino("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q").stdout
    info = json.loads(dino("info", str(idx), "--json").stdout)
    assert info["precision"] == "bf16" and info["photos_failed"] == 1
    text = dino("info", str(idx), "--failed").stdout  # an index holding a failed file (crashed before)
    assert "failed: " in text and "broken.jpg" in text and "None" not in text
    query = sorted(photos.rglob("*.jpg"))[3]
    hits = json.loads(dino("search", str(idx), str(query), "-k", "2", "--json").stdout)
    assert hits[0]["path"] == str(query) and hits[0]["score"] > 0.999  # the query embeds in bf16 like the index
    no_bf16 = {**ENV, "DINOSEARCH_CPU_BF16": "0"}  # another machine: its own choice would be fp32
    shutil.copy(sample_photos(3)[2], photos / "new.jpg")
    assert "1 indexed" in dino("index", str(photos), "--index", str(idx), "-q", env=no_bf16).stdout
    hits = json.loads(dino("search", str(idx), str(photos / "new.jpg"), "-k", "1", "--json", env=no_bf16).stdout)
    assert hits[0]["path"] == str(photos / "new.jpg") and hits[0]["score"] > 0.999
    p = dino("index", str(photos), "--index", str(idx), "--precision", "fp32", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "built with precision bf16; --precision fp32" in lines[0]
    p = dino("search", str(idx), str(query), "--precision", "fp32", check=False)
    assert p.returncode == 2 and "built with precision bf16" in p.stderr and "Traceback" not in p.stderr


def test_serve_starts_on_a_bf16_index_and_takes_model_flags(photos, tiny_model, tmp_path):
    import urllib.request

    from conftest import free_port

    idx = tmp_path / "idx"
    env = {**ENV, "DINOSEARCH_CPU_BF16": "1"}
    subprocess.run([sys.executable, "-m", "api.cli", "index", str(photos), "--index", str(idx), "--model", str(tiny_model),
                    "-q"], env=env, check=True, capture_output=True, timeout=600)
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", str(idx), "--port", str(port), "--device", "cpu",
                            "--precision", "bf16", "--nprobe", "4"], env={**ENV, "DINOSEARCH_CPU_BF16": "0"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert srv.poll() is None, srv.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
                    stats = json.loads(r.read())
                break
            except OSError:
                assert time.time() < deadline, "server did not start"
                time.sleep(0.3)
        assert stats["precision"] == "bf16"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/photos/3/similar?k=1", timeout=30) as r:
            assert json.loads(r.read())["results"][0]["id"] == 3
    finally:
        srv.terminate()
        srv.wait(10)
    # an explicit other precision than the index's: one line, and the server does not start
    p = subprocess.run([sys.executable, "-m", "api.cli", "serve", str(idx), "--port", str(free_port()), "--precision", "fp32"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "built with precision bf16" in p.stderr and "Traceback" not in p.stderr


def test_json_stays_parseable_with_other_flags(photos, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    run("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q")
    q = str(sorted(photos.rglob("*.jpg"))[0])
    hits = json.loads(run("search", str(idx), q, "-k", "3", "--box", "10,10,120,90", "--json", "--draw", str(tmp_path / "d")).stdout)
    assert len(hits) == 3 and len(list((tmp_path / "d").glob("*.jpg"))) == 3
    assert all(0 < h["score"] <= 1.0 for h in hits)  # decoded SQ8 patches are not unit length: clipped to cosine
    parts = json.loads(run("parts", str(idx), q, "--k", "3", "--json", "--out", str(tmp_path / "p.png")).stdout)
    assert len(parts["labels"]) == 16 and (tmp_path / "p.png").is_file()


def test_unknown_label_says_so_and_offers_near_ones(photos, tiny_model, tmp_path):
    idx = tmp_path / "idx"
    run("index", str(photos), "--index", str(idx), "--model", str(tiny_model), "-q")
    p = run("search", str(idx), "1", "--id", "--label", "dog", check=False)
    assert p.returncode == 2 and "no photo has class tags" in p.stderr and "--classify" in p.stderr


def test_missing_faiss_is_one_line_naming_the_extra(tmp_path):
    code = "import sys; sys.modules['faiss'] = None; from api.cli import main; sys.exit(main(['info', 'x']))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == (
        "dinosearch: error: FAISS is not installed: install dinosearch with an extra, "
        "pip install '.[cpu]' (or '.[gpu]' on a CUDA machine; `make setup` does it)")


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("small")
    folder = root / "photos"
    folder.mkdir()
    for p in sample_photos(1)[:6]:
        shutil.copy(p, folder / p.name)
    run("index", str(folder), "--index", str(root / "idx"), "--model", str(tiny_model), "-q")
    return root


@pytest.mark.parametrize("args, message", [
    (["index", "{photos}", "--index", "{root}/n1", "--model", "{model}", "--resolution", "-14"], "--resolution must be between"),
    (["index", "{photos}", "--index", "{root}/n2", "--model", "{model}", "--resolution", "0"], "--resolution must be between"),
    (["index", "{photos}", "--index", "{root}/n3", "--model", "{model}", "--resolution", "28000"], "--resolution must be between"),
    (["index", "{photos}", "--index", "{root}/n4", "--model", "{model}", "--resolution", "5"], "not a multiple of the patch size 14; try 14"),
    (["index", "{photos}", "--index", "{root}/n5", "--model", "{model}", "--device", "bogus"], "unknown device 'bogus'"),
    (["index", "{photos}", "--index", "{root}/n6", "--model", "{model}", "--device", "cuda"], "no CUDA GPU"),
    (["index", "{photos}", "--index", "{root}/n7", "--model", "{model}", "--global-kind", "HNSW32"], "cannot delete vectors"),
    (["index", "{photos}", "--index", "{root}/n8", "--model", "{model}", "--patch-kind", "IVF16,Bogus"], "bad FAISS index kind"),
    (["index", "{photos}", "--index", "{root}/photos/a.jpg", "--model", "{model}"], "is a file, not an index directory"),
    (["index", "{photos}", "--index", "{root}/n9", "--model", "{root}/garbage"], "cannot load model"),
    (["index", "{photos}", "--index", "{root}/n10", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["index", "{photos}", "--index", "{root}/n11", "--workers", "-1"], "--workers: must be at least 0, got -1"),
    (["index", "{photos}", "--index", "{root}/n12", "--commit-every", "0"], "--commit-every: must be at least 1"),
    (["search", "{root}/idx", "1", "--id", "--nprobe", "0"], "--nprobe: must be at least 1, got 0"),
    (["search", "{root}/idx", "1", "--id", "-k", "-1"], "-k: must be at least 1"),
    (["search", "{root}/idx", str(2**70), "--id"], "is not in the index"),
    (["search", "{root}/photos/a.jpg", "1", "--id"], "is a file, not an index directory"),
    (["parts", "{root}/idx", "--collection", "--sample", "0"], "--sample: must be at least 1"),
    (["parts", "{root}/idx", "--collection", "--sample", "-1"], "--sample: must be at least 1"),
    (["info", "{root}/photos/a.jpg"], "is a file, not an index directory"),
])
def test_bad_values_are_one_line_errors(small_index, tiny_model, args, message):
    root = small_index
    (root / "photos" / "a.jpg").write_bytes((root / "photos" / next(p.name for p in (root / "photos").iterdir())).read_bytes())
    garbage = root / "garbage"
    if not garbage.exists():  # a model directory whose weights are garbage
        shutil.copytree(tiny_model, garbage)
        (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    p = run(*(a.format(root=root, photos=root / "photos", model=tiny_model) for a in args), check=False)
    err = [line for line in p.stderr.strip().splitlines() if not line.startswith("usage:") and not line.startswith("  ")]
    assert p.returncode == 2 and len(err) == 1 and message in err[0] and "Traceback" not in p.stderr, p.stderr


def test_short_token_is_one_line(small_index):
    p = subprocess.run([sys.executable, "-m", "api.cli", "serve", str(small_index / "idx"), "--port", "1"],
                       env={**ENV, "DINOSEARCH_TOKEN": "short"}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "dinosearch: error: DINOSEARCH_TOKEN must be at least 16 characters (write routes are guarded by it)"
