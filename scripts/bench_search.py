"""Search latency and recall, against exact search measured in the same run.

    python scripts/bench_search.py [--global-n 100000 1000000] [--photos 10000]

Data (synthetic, d=384 like dinov2-small, stated so the figures can be read):
- global: vectors around 4096 random unit centres, varying (norm ~0.5) along a
  shared 32-dim subspace plus isotropic noise (norm ~0.2), L2-normalized; 500
  held-out queries from the same distribution.
- region: 10k "photos" of 16x16 patches; each photo is a layout of 8 "visual
  words" out of 4096 (a Voronoi split of its grid) plus per-patch noise. A query
  is a 4x4 box of one photo, and that region is also planted, with noise, at a
  random other place in 9 other photos (what region search is for). Exact =
  late interaction (mean over query patches of the best match per photo) over
  every float32 patch.

Both indexes are built with the indexer's own code (the Writer's commit, then
compaction into one sealed segment whose kind is chosen by size: HNSW32 for
global vectors past 200k) and queried through search.Engine, global searches
with one FAISS thread (as one server thread answers a query). Raw FAISS IVF
over the same global vectors is measured beside it for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.compact import compact  # noqa: E402
from indexer.faissio import make_index  # noqa: E402
from indexer.manifest import Manifest  # noqa: E402
from indexer.segments import HNSW_EF_SEARCH  # noqa: E402
from indexer.writer import Writer  # noqa: E402
from search import Engine  # noqa: E402

D = 384


def clustered(n: int, centres: np.ndarray, basis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points near unit-norm centres: a variation of norm ~0.5 along a shared 32-dim subspace plus
    isotropic noise of norm ~0.2 (embeddings of photos live near a low-dimensional manifold)."""
    out = np.empty((n, centres.shape[1]), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        z = rng.standard_normal((e - s, basis.shape[0]), np.float32)
        x = centres[rng.integers(0, len(centres), e - s)] + float(0.5 / np.sqrt(basis.shape[0])) * z @ basis
        x += rng.standard_normal(x.shape, np.float32) * 0.01
        faiss.normalize_L2(x)
        out[s:e] = x
    return out


def unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d), np.float32)
    faiss.normalize_L2(x)
    return x


def pct(ts: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ts) * 1000, q))


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def measure(index, xq: np.ndarray, gt: np.ndarray) -> dict:
    """recall@10 and batch QPS over all queries, latency of one query per call."""
    t = time.perf_counter()
    _, found = index.search(xq, 10)
    qps = len(xq) / (time.perf_counter() - t)
    ts = []
    for i in range(len(xq)):
        t = time.perf_counter()
        index.search(xq[i : i + 1], 10)
        ts.append(time.perf_counter() - t)
    return {"recall": recall_at(found, gt, 10), "p50": pct(ts, 50), "p99": pct(ts, 99), "qps": qps}


def through_store(xb: np.ndarray, out: Path) -> tuple[Engine, float, float, str]:
    """xb written as photos through the Writer (a one-cell patch grid: the patch index stays the global one's size),
    then compaction seals them into the kind their count calls for, as `dinosearch compact` / `serve
    --compact-every` leave an index. Returns the engine and (write, compaction) seconds and the sealed kind."""
    n = len(xb)
    idx = out / f"global-{n}"
    shutil.rmtree(idx, ignore_errors=True)
    m = Manifest(model="synthetic", model_type="dinov2", revision=None, dim=D, patch_size=14, num_registers=0,
                 resolution=14, grid=1, mean=(0.5,) * 3, std=(0.5,) * 3, precision="fp32", fingerprint=[0.0] * D)
    t = time.perf_counter()
    with Writer(idx, m) as w:
        for s in range(0, n, 50_000):
            e = min(n, s + 50_000)
            w.manifest.next_id = e + 1
            w.add([(i + 1, f"/synthetic/{i:07d}.jpg", 0, 0, f"{i:032x}", 14, 14) for i in range(s, e)], xb[s:e],
                  xb[s:e].reshape(e - s, 1, 1, D))
        w.commit()
    write = time.perf_counter() - t
    t = time.perf_counter()
    report = compact(idx, force=True, kinds={"patches": "SQ8"})  # the one-cell grid's patches are not measured
    sealed = time.perf_counter() - t
    return Engine(idx), write, sealed, report.kinds.get("global", "?")


def measure_engine(engine: Engine, xq: np.ndarray, gt: np.ndarray) -> dict:
    """Engine.similar_by_vector, one query per call (the exact re-rank, the catalog's paths: all of a search)."""
    ts, found = [], []
    for q in xq:
        t = time.perf_counter()
        hits = engine.similar_by_vector(q, 10)
        ts.append(time.perf_counter() - t)
        found.append([h.photo_id - 1 for h in hits])
    return {"recall": recall_at(np.array(found), gt, 10), "p50": pct(ts, 50), "p99": pct(ts, 99), "qps": 1000 / pct(ts, 50)}


def bench_global(n: int, rng: np.random.Generator, out: Path, nq: int = 500) -> list[dict]:
    centres = unit(4096, D, rng)
    basis = unit(32, D, rng)
    xb = clustered(n, centres, basis, rng)
    xq = clustered(nq, centres, basis, rng)
    flat = faiss.IndexFlatIP(D)
    flat.add(xb)
    t = time.perf_counter()
    _, gt = flat.search(xq, 10)
    exact_batch_qps = nq / (time.perf_counter() - t)
    ts = []
    for i in range(50):
        t = time.perf_counter()
        flat.search(xq[i : i + 1], 10)
        ts.append(time.perf_counter() - t)
    rows = [{"n": n, "kind": "Flat (exact)", "param": "-", "recall": 1.0, "p50": pct(ts, 50), "p99": pct(ts, 99), "qps": exact_batch_qps}]
    del flat
    engine, write_s, seal_s, kind = through_store(xb, out)
    print(f"  {n}: written through the Writer in {write_s:.0f} s, sealed by compaction as {kind} in {seal_s:.0f} s "
          f"({faiss.omp_get_max_threads()} threads)", flush=True)
    faiss.omp_set_num_threads(1)  # one query at a time, as a server thread answers it
    try:
        hnsw = [faiss.downcast_index(p.index.index) for p in engine.global_index.parts
                if isinstance(p.index, faiss.IndexIDMap2) and isinstance(faiss.downcast_index(p.index.index), faiss.IndexHNSW)]
        if hnsw:
            for ef in (32, 64, 128, 256):
                for h in hnsw:
                    h.hnsw.efSearch = ef
                default = " (default)" if ef == HNSW_EF_SEARCH else ""
                rows.append({"n": n, "kind": f"dinosearch {kind}", "param": f"efSearch {ef}{default}",
                             **measure_engine(engine, xq, gt), "build_s": seal_s})
        else:
            rows.append({"n": n, "kind": f"dinosearch {kind}", "param": "-", **measure_engine(engine, xq, gt),
                         "build_s": seal_s})
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    del engine
    shutil.rmtree(out / f"global-{n}", ignore_errors=True)
    kind = f"IVF{1 << round(np.log2(np.sqrt(n)))},Flat"  # for comparison: IVF, which FAISS can delete from
    t = time.perf_counter()
    index = make_index(kind, D, xb[rng.choice(n, min(n, 64 * 1024), replace=False)])
    index.add_with_ids(xb, np.arange(n, dtype=np.int64))
    build = time.perf_counter() - t
    for nprobe in (8, 32, 128):
        index.nprobe = nprobe
        rows.append({"n": n, "kind": f"{kind} (raw FAISS)", "param": f"nprobe {nprobe}", **measure(index, xq, gt), "build_s": build})
    return rows


def synthetic_photos(n_photos: int, rng: np.random.Generator, grid: int = 16, words: int = 4096, per_photo: int = 8):
    vocab = unit(words, D, rng)
    yy, xx = np.mgrid[0:grid, 0:grid]
    cells = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)

    def photo() -> np.ndarray:
        seeds = rng.uniform(0, grid, (per_photo, 2)).astype(np.float32)
        owner = ((cells[:, None, :] - seeds[None]) ** 2).sum(-1).argmin(1)
        w = rng.choice(words, per_photo, replace=False)[owner]
        x = vocab[w] + rng.standard_normal((grid * grid, D), np.float32) * 0.035
        faiss.normalize_L2(x)
        return x

    return photo


def bench_region(n_photos: int, rng: np.random.Generator, out: Path, nq: int = 30, copies: int = 9) -> dict:
    grid, g2 = 16, 256
    make_photo = synthetic_photos(n_photos, rng)
    xp = np.empty((n_photos, g2, D), np.float32)
    for i in range(n_photos):
        xp[i] = make_photo()
    # each query's 4x4 region also appears, with noise, at another place in `copies` other photos
    queries = []
    for _ in range(nq):
        p = int(rng.integers(n_photos))
        r0, c0 = rng.integers(0, grid - 4, 2)
        region = xp[p].reshape(grid, grid, D)[r0 : r0 + 4, c0 : c0 + 4].copy()
        for o in rng.choice(n_photos, copies, replace=False):
            r1, c1 = rng.integers(0, grid - 4, 2)
            planted = region + rng.standard_normal(region.shape, np.float32) * 0.02
            planted /= np.linalg.norm(planted, axis=-1, keepdims=True)
            xp[o].reshape(grid, grid, D)[r1 : r1 + 4, c1 : c1 + 4] = planted
        qmask = np.zeros((grid, grid), bool)
        qmask[r0 : r0 + 4, c0 : c0 + 4] = True
        queries.append((p, qmask))
    idx = out / "region-idx"
    shutil.rmtree(idx, ignore_errors=True)
    m = Manifest(model="synthetic", model_type="dinov2", revision=None, dim=D, patch_size=14, num_registers=0,
                 resolution=224, grid=grid, mean=(0.5,) * 3, std=(0.5,) * 3, precision="fp32", fingerprint=[0.0] * D)
    t = time.perf_counter()
    with Writer(idx, m) as w:
        for s in range(0, n_photos, 500):
            e = min(n_photos, s + 500)
            rows = [(i + 1, f"/synthetic/{i:06d}.jpg", 0, 0, f"{i:032x}", 224, 224) for i in range(s, e)]
            w.manifest.next_id = e + 1
            cls = xp[s:e].mean(1)
            faiss.normalize_L2(cls)
            w.add(rows, cls, xp[s:e].reshape(e - s, grid, grid, D))
        w.commit()
    compact(idx, force=True)  # one sealed segment, its patch kind chosen by size (trained on a bounded sample)
    build = time.perf_counter() - t
    engine = Engine(idx)
    live = [d["size"] for s in engine.manifest.segments for f, d in s["files"].items() if f.startswith("patches.")]
    patch_bytes = sum(live) / engine.patch_index.ntotal  # the live segments' patch files
    flat = xp.reshape(-1, D)
    lat, exact_lat, recalls, truths = [], [], [], []
    with threadpool_limits(limits=os.cpu_count(), user_api="blas"):  # the baseline on every core (an Engine holds
        for p, qmask in queries:  # numpy's BLAS to one thread); the exact answers first: their 4 GB pass would
            xq = xp[p][qmask.ravel()]  # leave the next timed query cold. xq: the query photo's own patches
            t = time.perf_counter()
            exact = (xq @ flat.T).reshape(len(xq), n_photos, g2).max(-1).mean(0)
            truths.append(np.argsort(-exact, kind="stable")[:10] + 1)
            exact_lat.append(time.perf_counter() - t)
    for (p, qmask), truth in zip(queries, truths):
        xq = xp[p][qmask.ravel()]
        t = time.perf_counter()
        hits = engine.region_by_vectors(xq, 10, qcells=np.flatnonzero(qmask))
        lat.append(time.perf_counter() - t)
        recalls.append(len({h.photo_id for h in hits} & set(truth.tolist())) / 10)
    return {"photos": n_photos, "patches": int(engine.patch_index.ntotal), "kind": engine.manifest.patch_kind,
            "bytes_per_patch": patch_bytes, "build_s": build, "p50": pct(lat, 50), "p99": pct(lat, 99),
            "recall10": float(np.mean(recalls)), "exact_p50": pct(exact_lat, 50), "exact_p99": pct(exact_lat, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--global-n", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--photos", type=int, default=10_000, help="photos for the region benchmark (0: skip)")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-search")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; d={D}; latency = one query per call", flush=True)
    print(f"{'n':>8} {'kind':<16} {'param':<12} {'recall@10':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch QPS':>10}", flush=True)
    for n in a.global_n:
        rows = bench_global(n, rng, a.out)
        exact = rows[0]
        for r in rows:
            print(f"{r['n']:>8} {r['kind']:<16} {r['param']:<12} {r['recall']:>9.3f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
                  f"{r['qps']:>10.0f}   x{exact['p50'] / r['p50']:.0f} faster than exact (p50)", flush=True)
        ok = [r for r in rows[1:] if r["recall"] >= 0.95 and r["kind"].startswith("dinosearch")]
        if ok:
            best = min(ok, key=lambda r: r["p50"])
            print(f"  -> {n}: {best['kind']} {best['param']}: p50 {best['p50']:.2f} ms at recall@10 {best['recall']:.3f} "
                  f"(built in {best['build_s']:.0f}s)", flush=True)
    if a.photos:
        r = bench_region(a.photos, rng, a.out)
        print(f"\nregion: {r['photos']} photos, {r['patches']} patch vectors, {r['kind']}, {r['bytes_per_patch']:.1f} bytes/patch "
              f"on disk (built in {r['build_s']:.0f}s)")
        print(f"  index + exact re-rank: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, top-10 recall vs exact late interaction {r['recall10']:.3f}")
        print(f"  exact late interaction (numpy, every patch): p50 {r['exact_p50']:.0f} ms, p99 {r['exact_p99']:.0f} ms "
              f"-> x{r['exact_p50'] / r['p50']:.0f} faster")
    print("\nbars: global 1M p50 <= 0.5 ms at recall@10 >= 0.95; region 10k p50 <= 25 ms, recall >= 0.95; <= 64 bytes/patch")


if __name__ == "__main__":
    main()
