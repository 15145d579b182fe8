"""Indexing throughput, all measured in one run on this machine.

    python scripts/bench_index.py [--n 150] [--arch small] [--out out/bench-index]

Model: an architecture-exact DINOv2 (default dinov2-small) with random weights
(speed does not depend on weight values). Photos: Caltech-101 sample photos
upscaled with sensor-like noise to 12 MP (4032x3024) and ~1 MP (1152x864) JPEGs,
so decoding costs what camera photos cost. Prints:

  (a) model forward only, photos/s, at the indexer's batch size and precision
  (d) decode + preprocess only, photos/s on one core (12 MP and 1 MP)
  (b) the tutorial loop: PIL full decode + AutoImageProcessor + one photo per forward, fp32
  (c) `dinosearch index` end to end (a subprocess, as a user runs it)
  C = 1 / (1/a + 1/(2d)): the ceiling when decode and model share the 2 cores
  peak RSS of `dinosearch index` at N and 2N photos
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.embedder import Embedder, EmbedderConfig  # noqa: E402
from indexer.reader import DecodeJob, FileInfo, decode_file  # noqa: E402
from indexer.testing import save_random_model  # noqa: E402

SAMPLE = REPO / "data" / "caltech101-sample" / "images"
SIZES = {"12mp": (4032, 3024), "1mp": (1152, 864)}


def make_photos(out: Path, kind: str, n: int) -> list[Path]:
    """n JPEGs of the given size from the sample photos, with noise so they compress like camera photos."""
    from PIL import Image

    folder = out / kind
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(SAMPLE.glob("*.jpg"))
    w, h = SIZES[kind]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{kind}_{i:04d}.jpg"
        if not p.exists():
            img = Image.open(sources[i % len(sources)]).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
            a = np.asarray(img, dtype=np.int16) + rng.normal(0, 7, (h, w, 1)).astype(np.int16)
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p, "JPEG", quality=92)
        paths.append(p)
    return paths


def bench_model(e: Embedder, batch: int, seconds: float = 15.0) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    e.embed(x)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        e.embed(x)
        n += batch
    return n / (time.perf_counter() - t)


def bench_decode(paths: list[Path]) -> float:
    job = DecodeJob(224)
    infos = [FileInfo(str(p), p.stat().st_size, 0) for p in paths]
    decode_file(infos[0], job)
    t = time.perf_counter()
    for f in infos:
        assert decode_file(f, job).error is None
    return len(infos) / (time.perf_counter() - t)


def bench_tutorial(model_dir: Path, paths: list[Path]) -> float:
    """The loop most tutorials show: one photo at a time, full decode, the HF processor, fp32."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        model(**processor(images=Image.open(paths[0]).convert("RGB"), return_tensors="pt"))
        t = time.perf_counter()
        for p in paths:
            img = Image.open(p).convert("RGB")
            out = model(**processor(images=img, return_tensors="pt"))
            out.pooler_output.numpy()
    return len(paths) / (time.perf_counter() - t)


RSS_WRAPPER = """
import resource, sys
sys.argv = ["dinosearch"] + sys.argv[1:]
from api.cli import main
rc = main()
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("RSS", own, kids)
sys.exit(rc)
"""


def run_index(folder: Path, idx: Path, model_dir: Path, batch: int, workers: int) -> dict:
    shutil.rmtree(idx, ignore_errors=True)
    cmd = [sys.executable, "-c", RSS_WRAPPER, "index", str(folder), "--index", str(idx), "--model", str(model_dir),
           "-q", "--batch-size", str(batch), "--workers", str(workers)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr)
    m = re.search(r"(\d+) indexed.* in ([\d.]+)s \(([\d.]+) photos/s\)", p.stdout)
    own, kids = map(int, re.search(r"RSS (\d+) (\d+)", p.stdout).groups())
    return {"indexed": int(m[1]), "seconds": float(m[2]), "photos_s": float(m[3]), "wall": wall,
            "rss_mib": own / 1024, "worker_rss_mib": kids / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=150, help="photos per size (12 MP and 1 MP); mixed = 2n, RSS at 2n and 4n")
    ap.add_argument("--arch", default="small", help="tiny | small | base | large (random weights)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tutorial-n", type=int, default=40, help="photos per size for the slow tutorial loop")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-index")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = a.out / f"dinov2-{a.arch}-random"
    if not (model_dir / "config.json").exists():
        save_random_model(model_dir, a.arch)
    print(f"photos: generating/reusing {a.n} x 12 MP and {a.n} x 1 MP JPEGs in {a.out}", flush=True)
    sets = {k: make_photos(a.out, k, a.n) for k in SIZES}
    mixed = a.out / "mixed"
    double = a.out / "mixed2x"
    for folder, copies in ((mixed, 1), (double, 2)):
        for c in range(copies):
            for k, ps in sets.items():
                d = folder / f"{k}-{c}"
                d.mkdir(parents=True, exist_ok=True)
                for p in ps:
                    if not (d / p.name).exists():
                        os.link(p, d / p.name)

    e = Embedder(EmbedderConfig(model=str(model_dir), device="cpu"))
    r: dict = {"arch": a.arch, "precision": e.precision, "batch": a.batch_size, "workers": a.workers, "n": a.n,
               "cpu_count": os.cpu_count()}
    print(f"model: dinov2-{a.arch} (random weights), {e.precision}, batch {a.batch_size}, {os.cpu_count()} cores", flush=True)
    # This VM's speed drifts under sustained load (+-25% over minutes), so (a) is measured
    # again right before each (c) run and C uses the figure taken next to it.
    r["a_model"] = bench_model(e, a.batch_size)
    print(f"(a) model forward only        {r['a_model']:7.1f} photos/s", flush=True)
    for k, ps in sets.items():
        r[f"d_{k}"] = bench_decode(ps)
        print(f"(d) decode+preprocess {k:>5}   {r[f'd_{k}']:7.1f} photos/s (one core)", flush=True)
    for k, ps in sets.items():
        r[f"b_{k}"] = bench_tutorial(model_dir, ps[: a.tutorial_n])
        print(f"(b) tutorial loop {k:>5}       {r[f'b_{k}']:7.1f} photos/s", flush=True)
    r["b_mixed"] = 2 / (1 / r["b_12mp"] + 1 / r["b_1mp"])
    for k in SIZES:
        r[f"a_{k}"] = bench_model(e, a.batch_size, seconds=10)
        c = run_index(a.out / k, a.out / f"idx-{k}", model_dir, a.batch_size, a.workers)
        r[f"c_{k}"] = c["photos_s"]
        r[f"C_{k}"] = 1 / (1 / r[f"a_{k}"] + 1 / (2 * r[f"d_{k}"]))
        print(f"(c) dinosearch index {k:>5}    {c['photos_s']:7.1f} photos/s  = {c['photos_s'] / r[f'C_{k}']:.2f} x C "
              f"(C = {r[f'C_{k}']:.1f}, a = {r[f'a_{k}']:.1f} just before); {c['indexed']} photos, wall {c['wall']:.0f}s with start-up", flush=True)
    c1 = run_index(mixed, a.out / "idx-mixed", model_dir, a.batch_size, a.workers)
    c2 = run_index(double, a.out / "idx-mixed2x", model_dir, a.batch_size, a.workers)
    r["c_mixed"] = c1["photos_s"]
    r["rss_n"], r["rss_2n"] = c1["rss_mib"], c2["rss_mib"]
    r["worker_rss"] = max(c1["worker_rss_mib"], c2["worker_rss_mib"])
    print(f"(c) dinosearch index mixed    {c1['photos_s']:7.1f} photos/s  = {c1['photos_s'] / r['b_mixed']:.2f} x (b) mixed "
          f"({r['b_mixed']:.1f} photos/s)", flush=True)
    print(f"peak RSS: {c1['indexed']} photos {r['rss_n']:.0f} MiB, {c2['indexed']} photos {r['rss_2n']:.0f} MiB "
          f"-> ratio {r['rss_2n'] / r['rss_n']:.2f} (decode worker peak {r['worker_rss']:.0f} MiB)", flush=True)
    print("\nbars: (c) >= 0.85 x C per set; (c) >= 3 x (b) mixed; RSS(2N) < 1.2 x RSS(N)")
    for k in SIZES:
        print(f"  (c)/C {k:>5}: {r[f'c_{k}'] / r[f'C_{k}']:.2f}  {'ok' if r[f'c_{k}'] >= 0.85 * r[f'C_{k}'] else 'MISSED'}")
    print(f"  (c)/(b) mixed: {r['c_mixed'] / r['b_mixed']:.2f}  {'ok' if r['c_mixed'] >= 3 * r['b_mixed'] else 'MISSED'}")
    print(f"  RSS 2N/N: {r['rss_2n'] / r['rss_n']:.2f}  {'ok' if r['rss_2n'] < 1.2 * r['rss_n'] else 'MISSED'}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
