"""Write side: what one commit costs as the index grows, through the real Writer on synthetic vectors.

    python scripts/bench_write.py [--sizes 1000,10000,100000] [--dim 384] [--grid 16] [--batch 8]
                                  [--baseline-src DIR]

For each size N: fill an index with N photos (commits of --fill-commit photos), then time commits that each
add --batch new photos and replace --batch others (median of --repeat), and count the bytes the process
wrote for each (wchar in /proc/self/io: FAISS files, SQLite pages and WAL, everything). Printed as ratios to
the smallest size measured in the same run: the goal is flat in N.

--baseline-src DIR: a checkout of another version of dinosearch (e.g. `git archive main | tar -x -C DIR`);
the same measurement runs there in a child process (same Writer API: add, delete, commit) and is printed
beside this one, so both designs are measured in one run on the same machine state.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def written() -> int:
    """Bytes this process has passed to write() so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def measure(work: Path, n: int, dim: int, grid: int, batch: int, repeat: int, fill_commit: int, compacted: bool = False) -> dict:
    """Runs inside the source tree on sys.path (this one or --baseline-src)."""
    from indexer.manifest import Manifest
    from indexer.writer import Writer

    m = Manifest(model="synthetic", model_type="dinov2", revision=None, dim=dim, patch_size=14, num_registers=0,
                 resolution=grid * 14, grid=grid, mean=(0.0,) * 3, std=(1.0,) * 3, precision="fp32", fingerprint=[0.0] * dim)
    rng = np.random.default_rng(0)

    def vectors(b: int) -> tuple[np.ndarray, np.ndarray]:
        cls = rng.normal(size=(b, dim)).astype(np.float32)
        patches = rng.normal(size=(b, grid, grid, dim)).astype(np.float32)
        cls /= np.linalg.norm(cls, axis=1, keepdims=True)
        return cls, patches / np.linalg.norm(patches, axis=-1, keepdims=True)

    def rows(ids):
        return [(i, f"/photos/{i:08d}.jpg", 1000, 1, f"{i:032x}", 640, 480) for i in ids]

    idx = work / f"idx-{n}"
    shutil.rmtree(idx, ignore_errors=True)
    t = time.perf_counter()
    with Writer(idx, m) as w:
        for s in range(0, n, fill_commit):
            ids = [w.allocate_id() for _ in range(min(fill_commit, n - s))]
            w.add(rows(ids), *vectors(len(ids)))
            w.commit()
    fill_s = time.perf_counter() - t
    if compacted:  # as `serve --compact-every` or `dinosearch compact` leaves it: the fill's segments merged
        from indexer.compact import compact

        compact(idx, everything=True)
    secs, nbytes, opens = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with Writer(idx, m) as w:  # a run opens the index, adds and replaces a few photos, commits
            t1 = time.perf_counter()
            new = [w.allocate_id() for _ in range(batch)]
            old = rng.choice(np.arange(1, n + 1), batch, replace=False).tolist()
            w.add(rows(new + old), *vectors(2 * batch))
            b0, t2 = written(), time.perf_counter()
            w.commit()
            secs.append(time.perf_counter() - t2)
            nbytes.append(written() - b0)
        opens.append(t1 - t0)
    size = sum(p.stat().st_size for p in idx.rglob("*") if p.is_file())
    shutil.rmtree(idx, ignore_errors=True)
    return {"n": n, "fill_s": fill_s, "commit_s": statistics.median(secs), "commit_bytes": statistics.median(nbytes),
            "open_s": statistics.median(opens), "index_bytes": size}


def run_in(src: Path, args: argparse.Namespace, n: int, work: Path) -> dict:
    """One measurement in a child process importing dinosearch from ``src``."""
    code = (f"import sys, json; sys.path.insert(0, {str(src)!r}); sys.path.insert(0, {str(REPO / 'scripts')!r}); "
            f"from pathlib import Path; from bench_write import measure; "
            f"print(json.dumps(measure(Path({str(work)!r}), {n}, {args.dim}, {args.grid}, {args.batch}, {args.repeat}, "
            f"{args.fill_commit}{', True' if args.compacted and src == REPO else ''})))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(src)})
    if p.returncode != 0:
        raise SystemExit(f"bench_write: the measurement in {src} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="photos in the index before the measured commits")
    ap.add_argument("--dim", type=int, default=384, help="vector dims (384: dinov2-small)")
    ap.add_argument("--grid", type=int, default=16, help="patch grid side (16: 224 px at patch 14)")
    ap.add_argument("--batch", type=int, default=8, help="photos added and photos replaced per measured commit")
    ap.add_argument("--repeat", type=int, default=3, help="measured commits per size (median reported)")
    ap.add_argument("--fill-commit", type=int, default=1000, help="photos per commit while filling")
    ap.add_argument("--compacted", action="store_true", help="compact the filled index before the measured commits")
    ap.add_argument("--baseline-src", type=Path, default=None, help="another dinosearch source tree to measure beside this one")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-write-"))
    work.mkdir(parents=True, exist_ok=True)
    designs = [("this", REPO)] + ([("baseline", args.baseline_src.resolve())] if args.baseline_src else [])
    print(f"commit of {args.batch} new + {args.batch} replaced photos (d={args.dim}, {args.grid}x{args.grid} patches), "
          f"median of {args.repeat}; ratios to the first size of the same design", flush=True)
    print(f"{'design':9} {'photos':>8} {'commit s':>9} {'x':>6} {'MB written':>11} {'x':>6} {'open s':>7} {'index MB':>9} {'fill s':>8}",
          flush=True)
    try:
        first: dict[str, dict] = {}
        for n in sizes:
            for name, src in designs:
                r = run_in(src, args, n, work)
                f = first.setdefault(name, r)
                print(f"{name:9} {n:8d} {r['commit_s']:9.3f} {r['commit_s'] / f['commit_s']:6.2f} "
                      f"{r['commit_bytes'] / 1e6:11.2f} {r['commit_bytes'] / f['commit_bytes']:6.2f} {r['open_s']:7.3f} "
                      f"{r['index_bytes'] / 1e6:9.1f} {r['fill_s']:8.1f}", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
