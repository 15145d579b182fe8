"""Filtered global search at scale: latency and recall@10 against an exact filtered search, per selectivity.

    python scripts/bench_filters.py [--size 1000000] [--queries 200] [--kind FACTORY] [--nprobe N]
                                    [--seal-kind FACTORY | --no-compact] [--work DIR [--reuse]] [--mapped]

--size synthetic unit vectors (d=384; --data: bench_search's global data by default) are written through the indexer's own Writer (a fresh segment of the
kind a run writes, or --kind; a one-cell patch grid, so the patch index stays the size of the global one) with a date
taken per photo, every photo a distinct minute in a shuffled order. A date range then passes 50%, 5%, 1% or 0.1% of
the photos (and a first row without a filter, the baseline). Each query is an indexed photo's vector, answered by ``Engine.search`` (the engine's own filter planning:
the filter evaluated in numpy over the commit's catalog columns, then the plan ``Engine.global_plan`` names), and
compared with the exact top-10 among the photos that pass (numpy over the raw vectors, computed for a row's queries
before they are timed back to back). Printed per selectivity: the
plan, p50/p99 of the whole search and of its filter part (``Engine.filter_passing``; the first query of a commit also
reads the columns, timed apart as "columns read"), recall@10.

The rows are measured twice: on the index as the run wrote it ("fresh"), then after compaction sealed it into the
kind its size calls for ("sealed": HNSW32 past 200k photos; --seal-kind forces one), as `serve --compact-every` or
`dinosearch compact` leaves it. The engine is a server's (EngineConfig.resident: global vectors read whole onto huge
pages); --mapped measures a one-shot CLI search's (vectors mapped from the files).
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

from bench_search import clustered, unit  # noqa: E402

from indexer.compact import compact  # noqa: E402
from indexer.manifest import Manifest  # noqa: E402
from indexer.reader import PhotoMeta  # noqa: E402
from indexer.writer import Writer  # noqa: E402
from search import Engine, EngineConfig, Example, Filters, SearchQuery  # noqa: E402

BASE = dt.datetime(2000, 1, 1)
SELECTIVITY = (1.0, 0.5, 0.05, 0.01, 0.001)  # 1.0: no filter, the baseline


def vectors(n: int, dim: int, rng: np.random.Generator, data: str) -> np.ndarray:
    """n unit vectors: "manifold" is bench_search's global data (near 4096 centres along a shared 32-dim subspace);
    "isotropic" puts n/1000 centres under noise of 1.5x their norm in every dimension, a worst case for graph
    indexes (HNSW32 reaches recall@10 0.88 on it at 1M, unfiltered)."""
    if data == "manifold":
        return clustered(n, unit(4096, dim, rng), unit(32, dim, rng), rng)
    centres = rng.standard_normal((max(16, n // 1000), dim)).astype(np.float32)
    xb = centres[rng.integers(0, len(centres), n)] + 1.5 * rng.standard_normal((n, dim)).astype(np.float32)
    faiss.normalize_L2(xb)
    return xb


def build(idx: Path, xb: np.ndarray, rng: np.random.Generator, kind: str | None, batch: int = 20_000) -> None:
    """An index of the photos xb (row i = photo id i + 1) through the Writer, each with a date taken."""
    n, dim = xb.shape
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


def pct(ts: list[float], q: float) -> float:
    return float(np.percentile(np.array(ts) * 1e3, q))


def measure(engine: Engine, stage: str, xb: np.ndarray, size: int, queries: int, k: int, rng: np.random.Generator) -> None:
    print(f"{'stage':<6} {'pass':>6} {'photos':>8} {'plan':>5} {'p50 ms':>7} {'p99 ms':>7} {'filter p50':>10} {'recall@10':>9}",
          flush=True)
    for sel in SELECTIVITY:
        f = Filters(taken_before=(BASE + dt.timedelta(minutes=int(sel * size))).isoformat(timespec="seconds")) if sel < 1 else Filters()
        passing = engine.filter_passing(f)  # None: no filter (the unfiltered baseline row)
        ids = passing.ids if passing is not None else np.arange(1, size + 1)
        plan = engine.global_plan(passing)
        qs = rng.integers(1, size + 1, queries)
        truth = []  # the exact filtered top-k first: its pass over the passing rows (up to 1.5 GB) would leave
        rows = xb if passing is None else xb[ids - 1]  # each timed query cold; the engine's then run back to back
        for c in range(0, len(qs), 50):
            scores = rows @ xb[qs[c:c + 50] - 1].T
            truth += [set(ids[np.argsort(-col, kind="stable")[:k]].tolist()) for col in scores.T]
        del rows, scores
        lat, filt, rec = [], [], []
        for q, want in zip(qs, truth):
            t = time.perf_counter()
            hits = engine.search(SearchQuery((Example(int(q)),), filters=f, k=k)).hits
            lat.append(time.perf_counter() - t)
            rec.append(len({h.photo_id for h in hits} & want) / min(k, len(ids)))
        for _ in qs:
            t = time.perf_counter()
            engine.filter_passing(f)
            filt.append(time.perf_counter() - t)
        print(f"{stage:<6} {sel:>6.1%} {len(ids):>8} {plan:>5} {pct(lat, 50):>7.2f} {pct(lat, 99):>7.2f} "
              f"{pct(filt, 50):>10.2f} {np.mean(rec):>9.3f}", flush=True)


def describe(engine: Engine) -> str:
    kinds = sorted({type(faiss.downcast_index(p.index.index if isinstance(p.index, faiss.IndexIDMap2) else p.index))
                    .__name__.replace("Index", "") for p in engine.global_index.parts})
    huge = sorted({str(p.huge) for p in engine.global_index.parts})
    return (f"{len(engine.global_index.parts)} global segment(s) of {'/'.join(kinds)}; scan plan up to {engine.scan_limit():.0f} "
            f"photos; huge pages: {'/'.join(huge)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="synthetic photos (default 1000000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=200, help="queries per selectivity (default 200)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--kind", default=None, help="global index kind (default: what dinosearch chooses for --size), "
                   "e.g. IVF128,Flat to see the IVF plans at a small size")
    p.add_argument("--data", choices=("manifold", "isotropic"), default="manifold",
                   help="vector distribution (default: bench_search's global data; see vectors())")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists a query visits (default: the engine's)")
    p.add_argument("--seal-kind", default=None, help="global kind compaction seals into (default: by size)")
    p.add_argument("--no-compact", action="store_true", help="measure the fresh index only")
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="measure the index an earlier run left in --work (same --size, "
                   "--dim, --data: its vectors are made again from the seed) as it is: no build, no compaction")
    p.add_argument("--mapped", action="store_true", help="map the vectors from their files (a one-shot CLI search's "
                   "engine) instead of reading them whole onto huge pages (serve's, EngineConfig.resident)")
    a = p.parse_args()
    if a.reuse and a.work is None:
        p.error("--reuse needs the --work folder of an earlier run")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-filters-"))
    idx = work / "filters.idx"
    rng = np.random.default_rng(0)
    faiss.omp_set_num_threads(1)  # one query at a time, as a server thread answers it
    t0 = time.perf_counter()
    print(f"{'making' if a.reuse else 'building'} {a.size} synthetic photos (d={a.dim}, {a.data} data) with dates taken ...", flush=True)
    xb = vectors(a.size, a.dim, rng, a.data)
    if not a.reuse:
        shutil.rmtree(idx, ignore_errors=True)
        build(idx, xb, rng, a.kind)
    config = EngineConfig(resident=not a.mapped, **({} if a.nprobe is None else {"nprobe": a.nprobe}))
    t = time.perf_counter()
    engine = Engine(idx, config)
    print(f"engine loaded in {time.perf_counter() - t:.1f} s ({'mapped' if a.mapped else 'resident'})", flush=True)
    if a.reuse:
        _ = engine.columns
        print(f"as found: {describe(engine)}", flush=True)
        measure(engine, "found", xb, a.size, a.queries, a.k, rng)
        return
    t = time.perf_counter()
    cols = engine.columns
    print(f"columns of {int(cols.indexed.sum())} photos read in {(time.perf_counter() - t) * 1e3:.0f} ms (once per commit)", flush=True)
    print(f"built in {time.perf_counter() - t0:.0f} s; fresh: {describe(engine)}, nprobe {engine.config.nprobe}; "
          f"k={a.k}, {a.queries} queries per row, one FAISS thread", flush=True)
    measure(engine, "fresh", xb, a.size, a.queries, a.k, rng)
    if not a.no_compact:
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # compaction builds with every core, as `dinosearch compact`
        t = time.perf_counter()
        seal = {"patches": "SQ8"}  # the one-cell patch grid is a copy of the global vectors: not what is measured
        compact(idx, force=True, kinds=seal if a.seal_kind is None else {**seal, "global": a.seal_kind})
        faiss.omp_set_num_threads(1)
        assert engine.refresh(), "the engine did not see compaction's commit"
        _ = engine.columns  # read once per commit, outside the timed rows
        print(f"compacted in {time.perf_counter() - t:.0f} s; sealed: {describe(engine)}", flush=True)
        measure(engine, "sealed", xb, a.size, a.queries, a.k, rng)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
