"""The `dinosearch` command line: parse flags once, build typed configs, call the library."""

from __future__ import annotations

import os

# Before torch is imported: OpenMP threads must not spin while decode workers share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from indexer.errors import DinosearchError  # noqa: E402

log = logging.getLogger("dinosearch")

EPILOG = """examples:
  dinosearch index ~/Photos --index ~/photos.idx
  dinosearch index ~/Photos --index ~/photos.idx --model ./dinov2-small-dir
  dinosearch search ~/photos.idx query.jpg -k 10
  dinosearch info ~/photos.idx
"""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.runner import start_pool

    pool = start_pool(args.workers)  # decode processes start while the model loads
    try:
        return _index(args, pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _index(args: argparse.Namespace, pool) -> int:
    from indexer.embedder import Embedder, EmbedderConfig
    from indexer.runner import IndexConfig, index_folder
    from indexer.store import Snapshot, current_snapshot

    model, resolution = args.model, args.resolution
    idx = Path(args.index).expanduser()
    if idx.is_dir() and current_snapshot(idx) is not None:  # an existing index keeps its model and resolution
        m = Snapshot.open(idx).manifest
        model = model or m.model
        if resolution and resolution != m.resolution:
            raise DinosearchError(f"{idx} was built at {m.resolution}px; --resolution {resolution} needs a new --index")
        resolution = m.resolution
    embedder = Embedder(EmbedderConfig(
        model=model or "facebook/dinov2-small", revision=args.revision, resolution=resolution or 224,
        device=args.device, precision=args.precision,
    ))
    log.info("model %s on %s, %s, %dpx", embedder.config.model, embedder.device, embedder.precision, embedder.config.resolution)
    cfg = IndexConfig(
        batch_size=args.batch_size, workers=args.workers, commit_every=args.commit_every,
        global_kind=args.global_kind, patch_kind=args.patch_kind, retry_failed=args.retry_failed,
        progress=not args.quiet,
    )
    stats = index_folder(args.folder, idx, embedder, cfg, pool=pool)
    print(
        f"{stats.indexed} indexed, {stats.touched} touched, {stats.unchanged} unchanged, {stats.deleted} deleted, "
        f"{stats.failed} failed in {stats.seconds:.1f}s ({stats.photos_per_second:.1f} photos/s) -> {idx}"
    )
    for path, reason in stats.failures[:20]:
        print(f"  skipped {os.fsencode(path).decode('utf-8', 'replace')}: {reason}")
    if len(stats.failures) > 20:
        print(f"  ... and {len(stats.failures) - 20} more (see `dinosearch info {idx} --failed`)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from search import Engine, EngineConfig

    engine = Engine(args.index, EngineConfig(model=args.model, device=args.device, precision=args.precision))
    query: str | int = args.query
    if args.id:
        try:
            query = int(args.query)
        except ValueError:
            raise DinosearchError(f"--id expects a photo id (a number), got {args.query!r}") from None
    elif not Path(args.query).is_file():
        raise DinosearchError(f"query photo not found: {args.query}")
    hits = engine.similar(query, args.k)
    if args.json:
        print(json.dumps([{"id": h.photo_id, "path": h.path, "score": round(h.score, 6)} for h in hits], indent=1))
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:3d}  {h.score:.4f}  {h.path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from search import Engine

    engine = Engine(args.index)
    m, snap = engine.manifest, engine.snapshot
    counts = dict(engine.db.execute("SELECT status, count(*) FROM photos GROUP BY status").fetchall())
    files = {f.name: f.stat().st_size for f in snap.path.iterdir()}
    info = {
        "index": str(Path(args.index).expanduser().absolute()),
        "snapshot": snap.path.name,
        "model": m.model, "model_type": m.model_type, "revision": m.revision,
        "dim": m.dim, "resolution": m.resolution, "patch_grid": f"{m.grid}x{m.grid}", "precision": m.precision,
        "photos_indexed": counts.get("indexed", 0), "photos_failed": counts.get("failed", 0),
        "global_vectors": engine.global_index.ntotal, "global_kind": m.global_kind,
        "patch_vectors": engine.snapshot.patch_index().ntotal, "patch_kind": m.patch_kind,
        "files": files, "format_version": m.format_version,
    }
    failed = [(os.fsdecode(p), e) for p, e in engine.db.execute("SELECT path, error FROM photos WHERE status='failed' ORDER BY path")]
    if args.json:
        info["failed"] = [{"path": p, "error": e} for p, e in failed]
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key == "files":
            for name, size in sorted(value.items()):
                print(f"  {name:<16} {_human(size)}")
        else:
            print(f"{key:<16} {value}")
    shown = failed if args.failed else failed[:10]
    for p, e in shown:
        print(f"  failed: {os.fsencode(p).decode('utf-8', 'replace')}: {e}")
    if len(failed) > len(shown):
        print(f"  ... {len(failed) - len(shown)} more (--failed lists all)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from indexer.runner import default_workers

    p = argparse.ArgumentParser(
        prog="dinosearch", description="Image similarity search on DINOv2 features.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens, stage by stage")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_flags(q: argparse.ArgumentParser, default_help: str) -> None:
        q.add_argument("--model", default=None, help=f"hub id or local model directory ({default_help})")
        q.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
        q.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto: bf16/fp16 on GPU, bf16 on CPUs with native bf16 when faster, else fp32")

    q = sub.add_parser("index", help="index the photos in a folder (again: only what changed)",
                       description="Index the photos below FOLDER into the index directory; re-running updates it.")
    q.add_argument("folder", help="folder of photos (searched recursively)")
    q.add_argument("--index", required=True, help="index directory (created if missing)")
    model_flags(q, "default: the index's model, or facebook/dinov2-small for a new index")
    q.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    q.add_argument("--resolution", type=int, default=None, help="input side in pixels, a multiple of the patch size (default 224)")
    q.add_argument("--batch-size", type=int, default=16, help="photos per model forward (default 16)")
    q.add_argument("--workers", type=int, default=default_workers(), help=f"decode processes (default {default_workers()}; 0 = in-process)")
    q.add_argument("--commit-every", type=int, default=1000, help="photos between commits; a crash loses at most this much work")
    q.add_argument("--global-kind", default=None, help="FAISS factory string for the global index (default: by size)")
    q.add_argument("--patch-kind", default=None, help="FAISS factory string for the patch index (default: by size)")
    q.add_argument("--retry-failed", action="store_true", help="try again the files that failed before")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_index)

    q = sub.add_parser("search", help="photos like a query photo", description="Rank indexed photos by similarity to a query photo.")
    q.add_argument("index", help="index directory")
    q.add_argument("query", help="query photo (path), or a photo id with --id")
    q.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    q.add_argument("--id", action="store_true", help="QUERY is the id of an indexed photo")
    q.add_argument("--json", action="store_true", help="print results as JSON")
    model_flags(q, "default: the model that built the index")
    q.set_defaults(func=cmd_search)

    q = sub.add_parser("info", help="what an index holds", description="Model, counts, sizes, index kinds and failed files of an index.")
    q.add_argument("index", help="index directory")
    q.add_argument("--failed", action="store_true", help="list every failed file")
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        return args.func(args)
    except DinosearchError as e:
        print(f"dinosearch: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"dinosearch: error: not found: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinosearch: interrupted; committed work is kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
