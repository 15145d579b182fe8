"""Filtered global search at scale: latency and recall@10 against an exact filtered search, per selectivity.

    python scripts/bench_filters.py [--size 1000000] [--queries 200] [--kind FACTORY] [--work DIR]

--size synthetic unit vectors (d=384, clustered) are written through the indexer's own Writer (the index kind it
chooses for that count, or --kind; a one-cell patch grid, so the patch index stays the size of the global one) with a date
taken per photo, every photo a distinct minute in a shuffled order. A date range then passes 50%, 5%, 1% or 0.1% of
the photos. Each query is an indexed photo's vector, answered by ``Engine.search`` (the engine's own filter planning:
the filter evaluated in numpy over the commit's catalog columns, then the plan ``Engine.global_plan`` names), and
compared with the exact top-10 among the photos that pass (numpy over the raw vectors). Printed per selectivity: the
plan, p50/p99 of the whole search and of its filter part (``Engine.filter_ids``; the first query of a commit also
reads the columns, timed apart as "columns read"), recall@10.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.manifest import Manifest  # noqa: E402
from indexer.reader import PhotoMeta  # noqa: E402
from indexer.writer import Writer  # noqa: E402
from search import Engine, Example, Filters, SearchQuery  # noqa: E402

BASE = dt.datetime(2000, 1, 1)
SELECTIVITY = (0.5, 0.05, 0.01, 0.001)


def build(idx: Path, n: int, dim: int, rng: np.random.Generator, kind: str | None, batch: int = 20_000) -> np.ndarray:
    """An index of n synthetic photos through the Writer; returns their vectors (row i = photo id i + 1)."""
    centres = rng.standard_normal((max(16, n // 1000), dim)).astype(np.float32)
    xb = centres[rng.integers(0, len(centres), n)] + 1.5 * rng.standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(xb)
    minute = rng.permutation(n)  # photo i was taken at BASE + minute[i]
    m = Manifest(model="synthetic", model_type="dinov2", revision=None, dim=dim, patch_size=14, num_registers=0,
                 resolution=14, grid=1, mean=(0.5,) * 3, std=(0.5,) * 3, precision="fp32", fingerprint=[0.0] * dim,
                 kinds_forced=(kind, "SQ8"), patch_kind="SQ8")
    with Writer(idx, m) as w:
        for s in range(0, n, batch):
            e = min(n, s + batch)
            rows = [(i + 1, f"/synthetic/{i:07d}.jpg", 0, 0, f"{i:032x}", 14, 14) for i in range(s, e)]
            w.manifest.next_id = e + 1
            w.add(rows, xb[s:e], xb[s:e].reshape(e - s, 1, 1, dim))
            for i in range(s, e):
                taken = (BASE + dt.timedelta(minutes=int(minute[i]))).isoformat(timespec="seconds")
                w.set_meta(i + 1, rows[i - s][1], PhotoMeta(taken=taken, taken_source="DateTimeOriginal"))
            print(f"    added {e}/{n}", flush=True)
        w.commit()
    return xb


def pct(ts: list[float], q: float) -> float:
    return float(np.percentile(np.array(ts) * 1e3, q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="synthetic photos (default 1000000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=200, help="queries per selectivity (default 200)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--kind", default=None, help="global index kind (default: what dinosearch chooses for --size), "
                   "e.g. IVF128,Flat to see the IVF plans at a small size")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-filters-"))
    idx = work / "filters.idx"
    shutil.rmtree(idx, ignore_errors=True)
    rng = np.random.default_rng(0)
    faiss.omp_set_num_threads(1)  # one query at a time, as a server thread answers it
    t0 = time.perf_counter()
    print(f"building {a.size} synthetic photos (d={a.dim}) with dates taken ...", flush=True)
    xb = build(idx, a.size, a.dim, rng, a.kind)
    engine = Engine(idx)
    t = time.perf_counter()
    cols = engine.columns
    print(f"columns of {int(cols.indexed.sum())} photos read in {(time.perf_counter() - t) * 1e3:.0f} ms (once per commit)", flush=True)
    print(f"built in {time.perf_counter() - t0:.0f} s; global index {engine.manifest.global_kind}, nprobe "
          f"{engine.config.nprobe}; k={a.k}, {a.queries} queries per row, one FAISS thread", flush=True)
    print(f"{'pass':>6} {'photos':>8} {'plan':>5} {'p50 ms':>7} {'p99 ms':>7} {'filter p50':>10} {'recall@10':>9}", flush=True)
    for sel in SELECTIVITY:
        f = Filters(taken_before=(BASE + dt.timedelta(minutes=int(sel * a.size))).isoformat(timespec="seconds"))
        t = time.perf_counter()
        allowed = engine.filter_ids(f)
        ids = allowed
        plan = engine.global_plan(allowed)
        lat, filt, rec = [], [time.perf_counter() - t], []
        for q in rng.integers(1, a.size + 1, a.queries):
            t = time.perf_counter()
            engine.filter_ids(f)
            filt.append(time.perf_counter() - t)
            t = time.perf_counter()
            hits = engine.search(SearchQuery((Example(int(q)),), filters=f, k=a.k)).hits
            lat.append(time.perf_counter() - t)
            s = xb[ids - 1] @ xb[q - 1]
            truth = ids[np.argsort(-s, kind="stable")[: a.k]]
            rec.append(len({h.photo_id for h in hits} & set(truth.tolist())) / min(a.k, len(ids)))
        print(f"{sel:>6.1%} {len(ids):>8} {plan:>5} {pct(lat, 50):>7.2f} {pct(lat, 99):>7.2f} {pct(filt, 50):>10.2f} "
              f"{np.mean(rec):>9.3f}", flush=True)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
