"""Scale figures, measured on this machine, then carried to 100M photos / 1B patch vectors on paper.

    python scripts/bench_scale.py [--photos 96] [--vectors 200000]

1. Ray overhead: `index` of the same ~1 MP photos with the single-process pipeline
   and with `--ray local` (a 2-CPU local cluster, 1 embedding actor), same model
   (architecture-exact dinov2-small, random weights). Ray's start-up is reported apart.
2. Per-vector costs of each index kind at d=384 (synthetic clustered unit vectors):
   bytes per vector on disk, training time on a 65k sample, add time per vector in
   a shard, search p50 - all by building through indexer.build.build_sharded, the
   code `build-index` runs.
3. On paper: a 100M-photo global index and 1B patch vectors (~4M photos at 256
   patches each) from those measured costs - memory per kind, build time on N
   machines, and the embedding time (measured CPU rate; GPU rate an assumption,
   named as such).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_index import make_photos  # noqa: E402

from indexer.build import build_sharded  # noqa: E402
from indexer.embedder import Embedder, EmbedderConfig  # noqa: E402
from indexer.runner import IndexConfig, index_folder, start_pool  # noqa: E402
from indexer.testing import save_random_model  # noqa: E402

# NOT measured here (no GPU on this machine): an assumed DINOv2-S/14 224px bf16 rate on one data-centre GPU.
ASSUMED_GPU_PHOTOS_PER_S = 2000.0


def ray_vs_single(work: Path, n: int) -> tuple[float, float, float]:
    import ray

    from indexer.distributed import index_folder_ray

    paths = make_photos(work / "photos", "1mp", n)
    folder = paths[0].parent
    model = work / "dinov2-small"
    if not model.exists():
        save_random_model(model, "small")
    emb = Embedder(EmbedderConfig(model=str(model), device="cpu"))
    emb.embed(np.zeros((2, 224, 224, 3), np.uint8))
    cfg = IndexConfig(workers=1, progress=False, batch_size=16)
    shutil.rmtree(work / "single", ignore_errors=True)
    pool = start_pool(1)
    time.sleep(1.0)
    t = time.perf_counter()
    index_folder(folder, work / "single", emb, cfg, pool=pool)
    single = n / (time.perf_counter() - t)
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    startup = time.perf_counter() - t
    shutil.rmtree(work / "ray", ignore_errors=True)
    t = time.perf_counter()
    index_folder_ray(folder, work / "ray", emb, cfg, address="local", num_workers=1)
    on_ray = n / (time.perf_counter() - t)
    ray.shutdown()
    return single, on_ray, startup


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(1024, d)).astype(np.float32)
    x = centers[rng.integers(0, 1024, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def kind_costs(work: Path, n: int, d: int, kinds: list[str]) -> list[dict]:
    x = clustered(n, d)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    src = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    src.add_with_ids(x, ids)
    xq = clustered(200, d, seed=1)
    exact = faiss.IndexFlatIP(d)
    exact.add(x)
    _, gt = exact.search(xq, 10)
    gt = ids[gt]
    rows = []
    for kind in kinds:
        out = work / kind.replace(",", "_")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        t = time.perf_counter()
        index, shard_s = build_sharded(src, kind, d, out, "v", shards=4, workers=2, sample=65536)
        total = time.perf_counter() - t
        faiss.write_index(index, str(out / "v.faiss"))
        size = sum(f.stat().st_size for f in out.iterdir())
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = 32
        lat = []
        for q in xq[:100]:
            t = time.perf_counter()
            index.search(q[None], 10)
            lat.append(time.perf_counter() - t)
        _, found = index.search(xq, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, gt)])
        add_per_vec = sum(shard_s) / n if shard_s else None
        rows.append(dict(kind=kind, bytes=size / n, build=total, add_per_vec=add_per_vec,
                         train=total - sum(shard_s) if shard_s else total, p50=np.median(lat) * 1000, recall=recall))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=96)
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"work in {work}; {os.cpu_count()} CPUs, faiss {faiss.__version__}")

    rate = None
    if not args.skip_ray:
        single, on_ray, startup = ray_vs_single(work, args.photos)
        rate = single
        print(f"\n1. indexing {args.photos} ~1 MP photos, dinov2-small fp32 (random weights), this machine")
        print(f"   single process (1 decode worker)    {single:6.2f} photos/s")
        print(f"   --ray local (2 CPUs, 1 actor)       {on_ray:6.2f} photos/s   = x{on_ray / single:.2f} of single "
              f"(Ray start-up {startup:.1f} s, not included)")

    d = 384
    kinds = ["Flat", "IVF1024,Flat", "IVF1024,SQ8", "IVF1024,PQ48", "IVF1024,PQ24"]
    rows = kind_costs(work, args.vectors, d, kinds)
    print(f"\n2. per-vector costs, d={d}, {args.vectors} vectors, 4 shards on 2 threads, nprobe 32")
    print(f"   {'kind':<14} {'bytes/vec':>9} {'train s':>8} {'add us/vec':>10} {'p50 ms':>7} {'R@10':>5}")
    for r in rows:
        add = f"{r['add_per_vec'] * 1e6:10.2f}" if r["add_per_vec"] else f"{'-':>10}"
        print(f"   {r['kind']:<14} {r['bytes']:9.1f} {r['train']:8.1f} {add} {r['p50']:7.2f} {r['recall']:5.3f}")

    print("\n3. on paper (from the rows above; IDs and lists overhead included in bytes/vec)")
    by = {r["kind"]: r for r in rows}
    for label, n in (("100M photos, global", 100_000_000), ("1B patch vectors (~4M photos)", 1_000_000_000)):
        print(f"   {label}:")
        for kind in ("Flat", "IVF1024,SQ8", "IVF1024,PQ48", "IVF1024,PQ24"):
            r = by[kind]
            mem = n * r["bytes"] / 2**30
            add_h = (n * r["add_per_vec"] / 3600) if r["add_per_vec"] else None
            machines = int(np.ceil(mem / 48))  # 64 GB nodes, 48 GB of it for the index
            add_txt = f"fill {add_h:7.1f} core-h (this CPU, 2 threads per shard)" if add_h else "no lists to fill"
            print(f"     {kind:<14} {mem:9.1f} GiB -> {machines:4d} x 64 GB node(s) to hold it in RAM; {add_txt}")
    if rate:
        cpu_days = 100_000_000 / rate / 86400
        gpu_hours = 100_000_000 / ASSUMED_GPU_PHOTOS_PER_S / 3600
        print(f"   embedding 100M photos: {cpu_days:.0f} days on this 2-core machine (measured {rate:.1f} photos/s); "
              f"{gpu_hours:.0f} GPU-hours at an ASSUMED {ASSUMED_GPU_PHOTOS_PER_S:.0f} photos/s per GPU "
              f"(not measured here) -> 16 GPUs: {gpu_hours / 16:.1f} h, if decoding keeps up (~{ASSUMED_GPU_PHOTOS_PER_S / 98:.0f} "
              f"decode cores per GPU at the 98 photos/s/core measured for 1 MP JPEGs)")


if __name__ == "__main__":
    main()
