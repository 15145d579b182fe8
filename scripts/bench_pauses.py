"""The longest pause of an indexing run: the most time between two photos finishing, and what filled it.

    python scripts/bench_pauses.py [--n 10000] [--arch small-1] [--commit-every 1000] [--out out/bench-pauses]

Photos: --n JPEGs (320x240) cut from the Caltech-101 sample photos (random crops, flips, brightness), so every
file is a distinct photo. Model: --arch with random weights; the default "small-1" has dinov2-small's widths (384-d
vectors, 16x16 patches a photo) with one transformer layer, so 10k photos index in minutes on two cores while the
write side (batches, segments of 256 patch vectors a photo, commits) carries the sizes of the real model. The run
is `dinosearch index` as a user runs it (a subprocess); it reports its own longest pause (indexer/runner.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.testing import ARCHITECTURES, save_random_model  # noqa: E402

SAMPLES = REPO / "data" / "caltech101-sample" / "images"


def make_photos(folder: Path, n: int, rng: np.random.Generator) -> None:
    sources = sorted(SAMPLES.glob("*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = im.crop((x, y, x + cw, y + ch)).resize((320, 240))
            if rng.random() < 0.5:
                im = ImageOps.mirror(im)
            im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.7, 1.3)))
            sub = folder / f"{i // 1000:03d}"
            sub.mkdir(exist_ok=True)
            im.save(sub / f"photo_{i:06d}.jpg", quality=85)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="photos (default 10000)")
    ap.add_argument("--arch", default="small-1", choices=sorted(ARCHITECTURES), help="model sizes, random weights")
    ap.add_argument("--commit-every", type=int, default=1000, help="photos between commits (the CLI's default: 1000)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-pauses")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    shutil.rmtree(a.out, ignore_errors=True)
    photos, idx, model = a.out / "photos", a.out / "index", a.out / "model"
    t = time.perf_counter()
    make_photos(photos, a.n, rng)
    save_random_model(model, a.arch)
    print(f"{a.n} photos and a random {a.arch} model made in {time.perf_counter() - t:.0f} s", flush=True)
    cmd = [sys.executable, "-m", "api.cli", "index", str(photos), "--index", str(idx), "--model", str(model),
           "--commit-every", str(a.commit_every), "--quiet"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"bench_pauses: the index run failed:\n{p.stderr[-2000:]}")
    pause = re.search(r"longest pause between two photos: ([\d.]+)s \((\w+)\)", p.stdout)
    done = re.search(r"^(\d+) indexed.* in ([\d.]+)s \(([\d.]+) photos/s\)", p.stdout, re.M)
    if not pause or not done:
        raise SystemExit(f"bench_pauses: no summary in the run's output:\n{p.stdout[-2000:]}")
    segs = len(list(idx.glob("seg-*")))
    print(f"indexed {done[1]} photos in {wall:.0f} s ({done[3]} photos/s), {segs} segments, commits every "
          f"{a.commit_every} photos")
    print(f"longest pause between two photos: {float(pause[1]):.1f} s ({pause[2]})   goal: <= 10 s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
