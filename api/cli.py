"""The `dinosearch` command line: parse flags once, build typed configs, call the library."""

from __future__ import annotations

import os

# Before torch is imported: OpenMP threads must not spin while decode workers share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import functools  # noqa: E402
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
  dinosearch search ~/photos.idx query.jpg --box 120,40,380,300 -k 10 --draw out/
  dinosearch parts ~/photos.idx query.jpg --k 5 --out parts.png
  dinosearch parts ~/photos.idx --collection --k 64 --out parts/
  dinosearch search ~/photos.idx query.jpg --part 2 -k 10
  dinosearch index ~/Photos --index ~/photos.idx --classify --objects
  dinosearch search ~/photos.idx query.jpg --label "golden retriever" -k 10
  dinosearch search ~/photos.idx query.jpg --objects -k 10
  dinosearch search ~/photos.idx query.jpg --point 210,160 -k 10
  dinosearch index /shared/photos --index ~/photos.idx --ray local --num-workers 2
  dinosearch build-index ~/photos.idx --memory 8GB
  dinosearch index ~/Photos --index ~/photos.idx --store milvus://milvus-host:19530/photos
  dinosearch duplicates ~/photos.idx --kind edited
  dinosearch info ~/photos.idx
"""


def shown(path: str) -> str:
    """A path fit for a terminal or JSON: bytes that are not UTF-8 become U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def megapixels(mp: float) -> int:
    if mp <= 0:
        raise DinosearchError(f"--max-megapixels must be positive, got {mp:g}")
    return int(mp * 1_000_000)


def cmd_index(args: argparse.Namespace) -> int:
    from indexer.runner import start_pool

    if args.ray:
        return _index(args, None)
    pool = start_pool(args.workers)  # decode processes start while the model loads
    try:
        return _index(args, pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _index(args: argparse.Namespace, pool) -> int:
    from indexer.embedder import Embedder, EmbedderConfig
    from indexer.manifest import Manifest
    from indexer.runner import IndexConfig, index_folder
    from indexer.snapshot import current_snapshot

    watch = None
    if args.watch:  # bad values are refused before the model loads
        from indexer.watch import WatchConfig

        watch = WatchConfig(debounce=args.watch_debounce, interval=args.watch_interval)
    model, resolution, recorded = args.model, args.resolution, None
    idx = Path(args.index).expanduser()
    since = 1  # the first photo id this run can allocate (ids are given in order): --check-duplicates looks at those
    if idx.is_dir() and current_snapshot(idx) is not None:  # an existing index keeps its model, resolution, precision
        m = Manifest.load_current(idx)  # an index of the old snapshot format too: this run converts it
        since = m.next_id
        model, recorded = model or m.model, m.precision
        if resolution is not None and resolution != m.resolution:
            raise DinosearchError(f"{idx} was built at {m.resolution}px; --resolution {resolution} needs a new --index")
        resolution = m.resolution
    embedder = Embedder(EmbedderConfig(
        model=model or "facebook/dinov2-small", revision=args.revision, resolution=224 if resolution is None else resolution,
        device=args.device, precision=args.precision, index_precision=recorded,
    ))
    log.info("model %s on %s, %s, %dpx", embedder.config.model, embedder.device, embedder.precision, embedder.config.resolution)
    cfg = IndexConfig(
        batch_size=args.batch_size, workers=args.workers, commit_every=args.commit_every,
        global_kind=args.global_kind, patch_kind=args.patch_kind, retry_failed=args.retry_failed,
        progress=not args.quiet, max_pixels=megapixels(args.max_megapixels), decode_timeout=args.decode_timeout,
    )
    classifier = None
    if args.classify or args.classifier:
        from indexer.classifier import DEFAULT_CLASSIFIER, Classifier, ClassifierConfig

        name = args.classifier or (Manifest.load_current(idx).classifier if current_snapshot(idx) else None) or DEFAULT_CLASSIFIER
        classifier = Classifier(ClassifierConfig(model=name), device=embedder.device, precision=embedder.precision)
    segmenter = None
    if args.objects or args.sam_model:
        from indexer.objects import DEFAULT_SEGMENTER, Segmenter, SegmenterConfig

        # flags not given keep the index's own settings (else its objects would all be made anew)
        old = (Manifest.load_current(idx).segmenter if current_snapshot(idx) else None) or {}
        given = {"model": args.sam_model, "points_per_side": args.sam_points, "max_masks": args.sam_max_masks,
                 "min_iou": args.sam_min_iou, "min_stability": args.sam_min_stability, "min_area": args.sam_min_area,
                 "nms_iou": args.sam_nms}
        settings = {k: v for k, v in old.items() if k in SegmenterConfig.__dataclass_fields__} | {k: v for k, v in given.items() if v is not None}
        segmenter = Segmenter(SegmenterConfig(**{"model": DEFAULT_SEGMENTER} | settings),
                              device=embedder.device, precision=embedder.precision)
    if args.ray and segmenter is not None:
        raise DinosearchError("--objects does not run on Ray yet: index with --ray first, then run "
                              "`dinosearch index FOLDER --index IDX --objects` on one machine (no re-embedding)")

    def run(folder: str, pool=None):
        if args.ray:
            from indexer.distributed import index_folder_ray

            return index_folder_ray(folder, idx, embedder, cfg, address=args.ray, num_workers=args.num_workers,
                                    num_cpus=args.ray_cpus, store=args.store,
                                    classifier=classifier.config.model if classifier is not None else None)
        return index_folder(folder, idx, embedder, cfg, pool=pool, classifier=classifier, segmenter=segmenter, store=args.store)

    pools = [pool]  # the decode pool started early serves the first run; index_folder shuts it down

    def run_and_report(folder: str) -> None:
        first = Manifest.load_current(idx).next_id if current_snapshot(idx) else since  # this run's new photos: ids from here
        _report_run(run(folder, pools.pop() if pools else None), args, idx, classifier, segmenter, first)

    if watch is None:
        run_and_report(args.folder)
    else:
        _watch(args, idx, watch, run_and_report)
    return 0


def _watch(args: argparse.Namespace, idx: Path, config, run) -> None:
    """Index the folder, then keep the index in step with it until Ctrl-C (or SIGTERM), which stops after the current
    run's commit; a second Ctrl-C stops at once (committed work is kept either way)."""
    import signal
    import threading

    from indexer.watch import watch_folder

    stop = threading.Event()

    def finish(signum, _frame) -> None:
        print("dinosearch: stopping after the current run's commit (Ctrl-C again stops now)", file=sys.stderr, flush=True)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, finish)
    signal.signal(signal.SIGTERM, finish)
    print(f"watching {shown(str(Path(args.folder).expanduser().absolute()))}: each change is indexed once the folder is quiet "
          f"(Ctrl-C stops after the current commit)", flush=True)
    watch_folder(Path(args.folder).expanduser(), run, stop, config, ignore=(str(idx.absolute()),), initial=True,
                 on_fallback=lambda msg: print(f"dinosearch: {msg}", file=sys.stderr, flush=True))
    print("stopped watching", flush=True)


def _report_run(stats, args: argparse.Namespace, idx: Path, classifier, segmenter, since: int) -> None:
    tagged = f", {stats.labelled} tagged" if classifier is not None else ""
    if segmenter is not None:
        tagged += f", {stats.objects} objects in {stats.segmented} photos"
    print(
        f"{stats.indexed} indexed{tagged}, {stats.moved} moved, {stats.touched} touched, {stats.unchanged} unchanged, {stats.deleted} deleted, "
        f"{stats.failed} failed, {stats.not_images} not images in {stats.seconds:.1f}s ({stats.photos_per_second:.1f} photos/s) -> {idx}"
    )
    if stats.longest_pause:
        print(f"  longest pause between two photos: {stats.longest_pause:.1f}s ({stats.pause_cause})")
    for path, reason in stats.failures[:20]:
        print(f"  skipped {shown(path)}: {reason}")
    if len(stats.failures) > 20:
        print(f"  ... and {len(stats.failures) - 20} more (see `dinosearch info {idx} --failed`)")
    if args.check_duplicates:
        _report_added_duplicates(idx, since)
    sys.stdout.flush()


def _report_added_duplicates(idx: Path, since: int) -> None:
    """The photos this run added that duplicate another indexed photo (their candidates only, no full pass)."""
    from search import Engine
    from search.duplicates import added_links

    links, photos = added_links(Engine(idx), since)
    new = {i for lk in links for i in (lk.a, lk.b) if i >= since}
    print(f"{len(new)} new photo(s) duplicate indexed ones" + (":" if links else ""))
    for lk in links:
        t = f", {lk.match.transform}" if lk.match and lk.match.transform != "none" else ""  # lk.b > lk.a: b is new
        print(f"  {lk.kind} ({lk.score:.2f}{t}): {shown(photos[lk.b].path)} ~ {shown(photos[lk.a].path)}")


def _engine(args: argparse.Namespace):
    from search import Engine, EngineConfig

    return Engine(args.index, EngineConfig(model=args.model, device=args.device, precision=args.precision, nprobe=args.nprobe))


def _query(args: argparse.Namespace) -> str | int:
    if args.id:
        try:
            photo_id = int(args.query)
        except ValueError:
            raise DinosearchError(f"--id expects a photo id (a number), got {args.query!r}") from None
        if not 1 <= photo_id < 2**62:
            raise DinosearchError(f"photo id {photo_id} is not in the index (ids are 1 and up)")
        return photo_id
    if not Path(args.query).is_file():
        raise DinosearchError(f"query photo not found: {args.query}")
    return args.query


def _at_least(low: int):
    """An argparse type: an integer >= low (0, -1 or a huge k are refused, not silently changed)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v
    return parse


def _parsed(parse):
    """An argparse type from one of search.query's parsers (the HTTP API parses with the same functions)."""
    def convert(text: str):
        from search.query import BadQuery

        try:
            return parse(text)
        except BadQuery as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _filters(args: argparse.Namespace):
    from search.query import Filters, parse_date

    return Filters(label=args.label, taken_after=parse_date(args.taken_after), taken_before=parse_date(args.taken_before),
                   camera=args.camera, near=args.near, folder=args.folder)


def cmd_search(args: argparse.Namespace) -> int:
    import numpy as np

    from search.query import Example, SearchQuery

    engine = _engine(args)
    mask = None
    if args.mask is not None:
        from search.draw import load_photo

        mask = np.asarray(load_photo(args.mask).convert("L"))
    first = Example(_query(args), box=args.box, mask=mask, part=args.part, parts_k=args.parts_k,
                    objects=args.objects, point=args.point)
    q = SearchQuery((first, *args.like), unlike=tuple(args.unlike), filters=_filters(args), k=args.k)
    hits = engine.search(q).hits
    if args.json:  # one hit per line: an object's RLE mask stays on its line
        rows = [{"id": h.photo_id, "path": shown(h.path), "score": round(h.score, 6)} | ({"box": list(h.box)} if h.box else {})
                | ({"object": h.object_id, "mask": h.mask} if h.object_id is not None else {}) for h in hits]
        print("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]" if rows else "[]")
    else:
        for rank, h in enumerate(hits, 1):
            where = f"  box {','.join(map(str, h.box))}" if h.box else ""
            print(f"{rank:3d}  {h.score:.4f}  {shown(h.path)}{where}")
    if args.draw and hits:
        from search.draw import draw_box, heat_overlay, load_photo

        out = Path(args.draw)
        out.mkdir(parents=True, exist_ok=True)
        for rank, h in enumerate(hits, 1):
            img = load_photo(h.path)
            if h.heat is not None:
                img = draw_box(heat_overlay(img, h.heat), h.box)
            elif h.box is not None:
                img = draw_box(img, h.box)
            img.save(out / f"{rank:03d}_{Path(h.path).stem}.jpg", quality=90)
        print(f"drew {len(hits)} results in {out}", file=sys.stderr if args.json else sys.stdout)  # --json: stdout is JSON only
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from search import Engine

    total, page = Engine(args.index).browse(_filters(args), sort=args.sort, order=args.order, offset=args.offset,
                                            limit=args.limit)
    if args.json:  # one photo per line
        rows = [{"id": p.photo_id, "path": shown(p.path), "width": p.width, "height": p.height, "taken": p.taken,
                 "taken_source": p.taken_source, "make": p.make, "model": p.model, "lat": p.lat, "lon": p.lon} for p in page]
        lines = ",\n".join(json.dumps(r) for r in rows)
        print(f'{{"total": {total}, "photos": [' + (f"\n{lines}\n" if rows else "") + "]}")
        return 0
    for p in page:
        camera = " ".join(v for v in (p.make, p.model) if v) or "-"
        where = f"{p.lat:.5f},{p.lon:.5f}" if p.lat is not None else "-"
        taken = (p.taken or "-") + ("*" if p.taken_source == "mtime" else "")
        print(f"{p.photo_id:6d}  {taken:<20} {camera:<24} {where:<20} {shown(p.path)}")
    shown_to = args.offset + len(page)
    print(f"{args.offset + 1 if page else 0}-{shown_to} of {total} photos" + (" (* date from the file's mtime)" if any(
        p.taken_source == "mtime" for p in page) else ""), file=sys.stderr)
    return 0


def cmd_parts(args: argparse.Namespace) -> int:
    from search.draw import load_photo, parts_overlay

    engine = _engine(args)
    if args.collection:
        if args.query is not None:
            raise DinosearchError("--collection takes no query photo")
        parts = engine.collection_parts(args.k, sample=args.sample)
        if args.search is not None:  # one recurring part as a region query
            chosen = [cp for cp in parts if cp.part == args.search]
            if not chosen:
                raise DinosearchError(f"--search must be a part number between 0 and {len(parts) - 1}")
            hits = engine.region_by_vectors(chosen[0].center[None], args.top)
            for rank, h in enumerate(hits, 1):
                print(f"{rank:3d}  {h.score:.4f}  {shown(h.path)}  box {','.join(map(str, h.box))}")
            return 0
        out = Path(args.out) if args.out else None
        if out:
            out.mkdir(parents=True, exist_ok=True)
        rows = []
        for cp in parts:
            files = []
            for j, ph in enumerate(cp.photos):
                if out:
                    name = f"part{cp.part:03d}_{j}.jpg"
                    load_photo(ph.path).crop(ph.box).save(out / name, quality=90)
                    files.append(name)
            rows.append({"part": cp.part, "patches": cp.size, "photos": [
                {"id": ph.photo_id, "path": shown(ph.path), "patches": ph.patches, "box": list(ph.box)} | ({"crop": files[j]} if out else {})
                for j, ph in enumerate(cp.photos)]})
        if out:
            (out / "parts.json").write_text(json.dumps(rows, indent=1))
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                best = r["photos"][0] if r["photos"] else None
                print(f"part {r['part']:3d}  {r['patches']:6d} patches  most in {best['path'] if best else '-'} ({best['patches'] if best else 0})")
            if out:
                print(f"exemplar crops and parts.json in {out}")
        return 0
    if args.query is None:
        raise DinosearchError("give a query photo, or --collection")
    query = _query(args)
    parts = engine.parts(query, args.k)
    if args.json:
        print(json.dumps({"size": list(parts.size), "labels": parts.labels.tolist()}))
    else:
        for row in parts.labels:
            print(" ".join(f"{v:x}" if v < 16 else "+" for v in row))
    if args.out:
        path = engine.path_of([query])[query] if isinstance(query, int) else query
        parts_overlay(load_photo(path), parts.labels).save(args.out)
        print(f"overlay written to {args.out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from indexer import catalog
    from search import Engine

    engine = Engine(args.index)
    m, snap = engine.manifest, engine.snapshot
    counts = catalog.status_counts(engine.db)
    files = {"catalog.sqlite": (snap.root / "catalog.sqlite").stat().st_size}
    files.update({f"seg-{s['seg']:06d}/{f}": d["size"] for s in m.segments for f, d in s["files"].items()})
    info = {
        "index": str(Path(args.index).expanduser().absolute()),
        "snapshot": snap.name,
        "model": m.model, "model_type": m.model_type, "revision": m.revision,
        "dim": m.dim, "resolution": m.resolution, "patch_grid": f"{m.grid}x{m.grid}", "precision": m.precision,
        "photos_indexed": counts.get("indexed", 0), "photos_failed": counts.get("failed", 0),
        "global_vectors": engine.global_index.ntotal, "global_kind": m.global_kind,
        "patch_vectors": engine.patch_index.ntotal, "patch_kind": m.patch_kind,
        "segments": len(m.segments), "files": files, "format_version": m.format_version,
        "classifier": m.classifier, "tags": dict(engine.label_counts(20)),
        "segmenter": (m.segmenter or {}).get("model"), "objects": engine.object_count(),
        "not_images": sum(m.not_images_total().values()), "not_images_by_extension": m.not_images_total(),
        "store": m.store,
    }
    if engine.vectors is not None:  # the kind of each of the store's collections, read from the store itself
        info["store_kinds"] = {kind: engine.vectors.index_kind(kind) for kind in ("global", "patches", "objects")}
    failed = [(shown(os.fsdecode(p)), e) for p, e in catalog.failed_photos(engine.db)]
    if args.json:
        info["failed"] = [{"path": p, "error": e} for p, e in failed]
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if value is None:  # no revision, classifier or segmenter: nothing to say
            continue
        if key == "files":
            for name, size in sorted(value.items()):
                print(f"  {name:<16} {_human(size)}")
        elif key == "not_images_by_extension":
            if value:
                print("  " + ", ".join(f"{ext or '(no extension)'} {n}" for ext, n in value.items()))
        elif key == "store_kinds":
            print(f"{key:<16} " + ", ".join(f"{k} {v}" for k, v in value.items()))
        elif key == "tags":
            if value:
                print("tags (top-1)     " + ", ".join(f"{lab} {n}" for lab, n in value.items()))
        else:
            print(f"{key:<16} {value}")
    listed = failed if args.failed else failed[:10]
    for p, e in listed:
        print(f"  failed: {p}: {e}")
    if len(failed) > len(listed):
        print(f"  ... {len(failed) - len(listed)} more (--failed lists all)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("DINOSEARCH_TOKEN"):
        print(f"dinosearch: warning: serving on {args.host} without DINOSEARCH_TOKEN: write routes are disabled, "
              "read routes are open to the network", file=sys.stderr)
    from api.service import check_folder
    from indexer.embedder import keep_index_precision
    from indexer.manifest import Manifest
    from indexer.snapshot import current_snapshot
    from indexer.watch import WatchConfig

    if current_snapshot(Path(args.index).expanduser()) is not None:  # a flag at odds with the index: fail before serving
        keep_index_precision(args.precision, Manifest.load_current(Path(args.index).expanduser()).precision)
    settings = Settings(index=Path(args.index).expanduser(), model=args.model, device=args.device, precision=args.precision,
                        nprobe=args.nprobe, workers=args.workers, compact_every=args.compact_every,
                        max_upload_bytes=args.max_upload_mb * 2**20, commit_every=args.commit_every,
                        upload_timeout=args.upload_timeout, store=args.store, max_pixels=megapixels(args.max_megapixels),
                        max_upload_pixels=int(args.max_upload_megapixels * 1e6), host=args.host,
                        allowed_hosts=tuple(args.allowed_host), allowed_roots=tuple(Path(r) for r in args.allowed_root),
                        watch=tuple(Path(check_folder(os.path.abspath(os.path.expanduser(f)))) for f in args.watch),
                        watch_interval=WatchConfig(interval=args.watch_interval).interval)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from indexer.classifier import DEFAULT_CLASSIFIER, Classifier, ClassifierConfig
    from indexer.embedder import pick_device
    from indexer.reader import load_query
    from indexer.snapshot import Snapshot

    m = Snapshot.open(args.index).manifest
    name = args.classifier or m.classifier or DEFAULT_CLASSIFIER
    if not Path(args.photo).is_file():
        raise DinosearchError(f"photo not found: {args.photo}")
    clf = Classifier(ClassifierConfig(model=name, top_k=args.top), device=pick_device(args.device), precision="fp32")
    pixels, _ = load_query(args.photo, m.resolution)  # the whole photo, exactly as indexing sees it
    tags = clf.classify(pixels[None])[0]
    if args.json:
        print(json.dumps([{"label": lab, "prob": p} for lab, p in tags], indent=1))
    else:
        for lab, p in tags:
            print(f"{p:7.2%}  {lab}")
    return 0


def cmd_build_index(args: argparse.Namespace) -> int:
    from indexer.build import build_index, parse_memory

    r = build_index(args.index, kind=args.kind, patch_kind=args.patch_kind, memory=parse_memory(args.memory),
                    shards=args.shards, workers=args.workers)
    for name in r.kinds:
        shards = r.shard_seconds[name]
        extra = f", {len(shards)} shards filled in {sum(shards):.1f} s, merged on disk ({_human(r.bytes.get(name, 0))})" if shards else ""
        print(f"{name}: {r.vectors[name]} vectors -> {r.kinds[name]} in {r.seconds[name]:.1f} s{extra}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from indexer.compact import compact

    r = compact(args.index, everything=args.all)
    if args.json:
        print(json.dumps({"merged": r.inputs, "segment": r.seg, "kinds": r.kinds, "vectors": r.vectors, "dropped": r.dropped,
                          "seconds": {k: round(v, 3) for k, v in r.seconds.items()}}, indent=1))
    elif r.seg is None:
        print(f"nothing to compact in {args.index}: its segments are large and hold few tombstones")
    else:
        print(f"merged segments {', '.join(map(str, r.inputs))} into seg-{r.seg:06d}")
        for kind in r.kinds:
            print(f"{kind}: {r.vectors[kind]} vectors -> {r.kinds[kind]} in {r.seconds[kind]:.1f} s "
                  f"({r.dropped.get(kind, 0)} tombstoned vectors dropped)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from indexer.verify import verify

    r = verify(args.index, repair=args.repair)
    if args.json:
        print(json.dumps({"ok": r.ok, "snapshot": r.snapshot, "problems": r.problems, "repaired": r.repaired, "counts": r.counts}, indent=1))
    else:
        for line in r.repaired:
            print(f"repaired: {line}")
        for line in r.problems:
            print(f"problem: {line}")
        if r.ok:
            print(f"ok: {args.index} ({r.snapshot}: " + ", ".join(f"{k} {v}" for k, v in r.counts.items()) + ")")
    return 0 if r.ok else 1


def _unit(text: str) -> float:
    """An argparse type: a number between 0 and 1."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return v


def cmd_duplicates(args: argparse.Namespace) -> int:
    from search import Engine, EngineConfig
    from search.duplicates import DuplicateConfig, find_duplicates, move_copies, undo_moves

    if args.undo:
        rep = undo_moves(args.undo)
        if args.json:
            print(json.dumps({"manifest": rep.manifest, "moved": [{"from": shown(a), "to": shown(b)} for a, b in rep.moved],
                              "errors": [{"path": shown(a), "reason": r} for a, r in rep.errors]}, indent=1))
            return 0 if not rep.errors else 1
        for src, dst in rep.moved:
            print(f"moved back {shown(src)} -> {shown(dst)}")
        for path, reason in rep.errors:
            print(f"  not moved back {shown(path)}: {reason}")
        print(f"{len(rep.moved)} moved back, {len(rep.errors)} not (if `dinosearch index` ran since the move, run it again "
              f"on the folder so the index has them back)")
        return 0 if not rep.errors else 1
    if args.apply and not args.move_to:
        raise DinosearchError("--apply moves files only with --move-to DIR")
    cfg = DuplicateConfig(k=args.k, min_cosine=args.min_cosine, threshold=args.threshold, nprobe=args.nprobe, kind=args.kind)
    engine = Engine(args.index, EngineConfig(nprobe=args.nprobe))
    groups = find_duplicates(engine, cfg)
    rep = move_copies(groups, args.move_to, apply=args.apply) if args.move_to else None
    if args.json:
        out = {"groups": [g.to_dict() for g in groups]}
        if rep is not None:
            out["moves"] = {"applied": args.apply, "manifest": rep.manifest,
                            "moved": [{"from": shown(a), "to": shown(b)} for a, b in rep.moved],
                            "errors": [{"path": shown(a), "reason": r} for a, r in rep.errors]}
        for g in out["groups"]:
            for p in g["photos"]:
                p["path"] = shown(p["path"])
        print(json.dumps(out, indent=1))
    elif args.csv:
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["group", "kind", "keep", "id", "path", "width", "height", "bytes", "score", "relation", "transform",
                    "x0", "y0", "x1", "y1", "present"])
        for n, g in enumerate(groups, 1):
            for m in g.members:
                p = m.photo
                w.writerow([n, g.kind, int(p.id == g.keep), p.id, shown(p.path), p.width, p.height, p.bytes,
                            f"{m.score:.4f}", m.relation, m.transform or "", *(m.box or ("",) * 4), int(p.present)])
    else:
        if not groups:
            print(f"no duplicates in {args.index} ({len(engine)} photos)")
        for n, g in enumerate(groups, 1):
            why = "; ".join(g.reasons)
            print(f"group {n}: {g.kind}, {len(g.members)} photos, keep {g.keep if g.keep is not None else 'none'} ({why})")
            for m in g.members:
                p = m.photo
                mark = "keep" if p.id == g.keep else m.relation
                extra = f" {m.transform}" if m.transform not in (None, "none") else ""
                box = ",".join(map(str, m.box)) if m.box else "-"
                gone = "" if p.present else "  [gone or changed since indexing]"
                print(f"  {mark:8} {p.id:6} {p.width}x{p.height} {_human(p.bytes):>9} score {m.score:.2f} box {box}{extra}  "
                      f"{shown(p.path)}{gone}")
    if rep is not None and not args.json:
        verb = "moved" if args.apply else "would move"
        say = functools.partial(print, file=sys.stderr if args.csv else sys.stdout)  # the CSV stays CSV
        for src, dst in rep.moved:
            say(f"{verb} {shown(src)} -> {shown(dst)}")
        for path, reason in rep.errors:
            say(f"  not moved {shown(path)}: {reason}")
        if args.apply:
            say(f"{len(rep.moved)} moved, {len(rep.errors)} not; manifest {rep.manifest} "
                  f"(undo: dinosearch duplicates {args.index} --undo {rep.manifest}); "
                  f"re-run `dinosearch index FOLDER --index {args.index}` so the index forgets the moved files")
        else:
            say(f"dry run: {len(rep.moved)} would move; nothing moved (add --apply)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from indexer.runner import default_workers
    from search.query import parse_box, parse_example, parse_near, parse_point

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
                       help="auto: bf16/fp16 on GPU, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; "
                            "an index keeps the precision it was created with")

    def filter_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--label", default=None, help="only photos with this class tag (see `dinosearch info`)")
        q.add_argument("--taken-after", default=None, metavar="DATE", help="only photos taken on or after DATE (YYYY-MM-DD[THH:MM:SS])")
        q.add_argument("--taken-before", default=None, metavar="DATE", help="only photos taken before DATE")
        q.add_argument("--camera", default=None, metavar="TEXT", help="only photos whose camera make or model contains TEXT (any case)")
        q.add_argument("--near", type=_parsed(parse_near), default=None, metavar="LAT,LON,KM",
                       help="only photos taken within KM kilometres of LAT,LON (great-circle; photos without GPS never pass)")
        q.add_argument("--folder", default=None, metavar="DIR", help="only photos in DIR or below it")

    def query_flags(q: argparse.ArgumentParser) -> None:
        model_flags(q, "default: the model that built the index")
        q.add_argument("--nprobe", type=_at_least(1), default=32, help="IVF lists visited per query, for IVF index kinds (default 32)")

    q = sub.add_parser("index", help="index the photos in a folder (again: only what changed)",
                       description="Index the photos below FOLDER into the index directory; re-running updates it.")
    q.add_argument("folder", help="folder of photos (searched recursively)")
    q.add_argument("--index", required=True, help="index directory (created if missing)")
    model_flags(q, "default: the index's model, or facebook/dinov2-small for a new index")
    q.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    q.add_argument("--resolution", type=int, default=None, help="input side in pixels, a multiple of the patch size (default 224)")
    q.add_argument("--batch-size", type=_at_least(1), default=16, help="photos per model forward (default 16)")
    q.add_argument("--workers", type=_at_least(0), default=default_workers(), help=f"decode processes (default {default_workers()}; 0 = in-process)")
    q.add_argument("--commit-every", type=_at_least(1), default=1000, help="photos between commits; a crash loses at most this much work")
    q.add_argument("--global-kind", default=None, help="FAISS factory string for the global index (default: by size)")
    q.add_argument("--patch-kind", default=None, help="FAISS factory string for the patch index (default: by size)")
    q.add_argument("--retry-failed", action="store_true", help="try again the files that failed before")
    q.add_argument("--max-megapixels", type=float, default=150, help="larger photos are recorded as failed, not decoded (default 150)")
    q.add_argument("--decode-timeout", type=float, default=60, help="seconds one file may take to read and decode (default 60)")
    q.add_argument("--classify", action="store_true", help="tag photos with an image classifier (also tags an existing index without re-embedding)")
    q.add_argument("--classifier", default=None, help="hub id or directory of any image-classification model (default google/vit-base-patch16-224)")
    from indexer.objects import SegmenterConfig

    sd = SegmenterConfig()
    q.add_argument("--objects", action="store_true", help="find objects with SAM, embed each (also adds objects to an existing index)")
    q.add_argument("--sam-model", default=None, help="hub id or directory of a SAM model (default facebook/sam-vit-base)")
    q.add_argument("--sam-points", type=int, default=None, help=f"point grid per side (default {sd.points_per_side}: {sd.points_per_side**2} prompts a photo)")
    q.add_argument("--sam-max-masks", type=int, default=None, help=f"objects kept per photo, best first (default {sd.max_masks}, at most 256)")
    q.add_argument("--sam-min-iou", type=float, default=None, help=f"minimum SAM predicted IoU (default {sd.min_iou})")
    q.add_argument("--sam-min-stability", type=float, default=None, help=f"minimum stability score (default {sd.min_stability})")
    q.add_argument("--sam-min-area", type=float, default=None, help=f"minimum mask area, fraction of the photo (default {sd.min_area})")
    q.add_argument("--sam-nms", type=float, default=None, help=f"box IoU above which a mask is a duplicate (default {sd.nms_iou})")
    q.add_argument("--store", default=None, metavar="URI",
                   help="also keep the vectors in Milvus, which then answers searches: milvus://HOST:19530/NAME, "
                        "or milvus-lite:///PATH.db (embedded); an index remembers its store")
    q.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="decode and embed on Ray: 'local' (a cluster of this machine), 'auto' or ray://HEAD:10001; "
                        "photos must be at the same path on every node")
    q.add_argument("--num-workers", type=_at_least(1), default=2, help="with --ray: embedding actors, one model each (default 2)")
    q.add_argument("--ray-cpus", type=int, default=None, help="with --ray local: CPUs of the local cluster (default all)")
    q.add_argument("--check-duplicates", action="store_true",
                   help="after the run, list the photos it added that duplicate indexed ones (their candidates only)")
    q.add_argument("--watch", action="store_true",
                   help="after the run, keep the index in step with the folder: each burst of changes is indexed once the "
                        "folder is quiet (Ctrl-C stops after the current commit)")
    q.add_argument("--watch-interval", type=float, default=60.0,
                   help="with --watch, where the OS cannot watch the folder (inotify limit): seconds between scans (default 60)")
    q.add_argument("--watch-debounce", type=float, default=2.0, help="with --watch: seconds of quiet before a run (default 2)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_index)

    q = sub.add_parser("search", help="photos like a query photo, containing a region of it, or holding its object",
                       description="Rank indexed photos by similarity to a query photo (global), by how well they "
                                   "contain a region of it (--box, --mask, --part), or by their SAM objects "
                                   "(--objects, --point, --box with --objects), with where the match is.")
    q.add_argument("index", help="index directory")
    q.add_argument("query", help="query photo (path), or a photo id with --id")
    q.add_argument("-k", type=_at_least(1), default=10, help="number of results (default 10)")
    q.add_argument("--id", action="store_true", help="QUERY is the id of an indexed photo")
    q.add_argument("--box", type=_parsed(parse_box), default=None, metavar="X0,Y0,X1,Y1", help="region search: a box in the query photo's pixels")
    q.add_argument("--mask", default=None, metavar="IMAGE", help="region search: a mask image the size of the query photo (white = region)")
    q.add_argument("--part", type=int, default=None, help="region search: part N of the query photo (see `dinosearch parts`)")
    q.add_argument("--parts-k", type=_at_least(2), default=5, help="how many parts --part splits the photo into (default 5)")
    q.add_argument("--objects", action="store_true", help="object search: the query's main object (or the SAM mask of --box) "
                   "against every indexed object (index with --objects)")
    q.add_argument("--point", type=_parsed(parse_point), default=None, metavar="X,Y", help="object search: SAM's mask at this click in the query photo")
    q.add_argument("--like", type=_parsed(parse_example), action="append", default=[], metavar="PHOTO",
                   help="also like this photo (repeatable): a path, or an indexed photo id (only digits: 42; ./42 is a file), "
                        "whole or as PHOTO@X0,Y0,X1,Y1 (a region), @part=N, @object, @object=X0,Y0,X1,Y1 or @point=X,Y")
    q.add_argument("--unlike", type=_parsed(parse_example), action="append", default=[], metavar="PHOTO",
                   help="not like this photo (repeatable, as --like): photos nearer to it than to every liked one come last")
    filter_flags(q)
    q.add_argument("--draw", default=None, metavar="DIR", help="save each result with its heat map and match box in DIR")
    q.add_argument("--json", action="store_true", help="print results as JSON")
    query_flags(q)
    q.set_defaults(func=cmd_search)

    q = sub.add_parser("ls", help="list indexed photos with their date, camera and place, filtered and sorted",
                       description="Page through the indexed photos without a query: sorted by date taken, by when they "
                                   "were added or by path, with the same filters as search.")
    q.add_argument("index", help="index directory")
    filter_flags(q)
    q.add_argument("--sort", default="taken", choices=["taken", "added", "path"], help="order (default taken; undated photos last)")
    q.add_argument("--order", default="asc", choices=["asc", "desc"], help="ascending (default) or descending")
    q.add_argument("--offset", type=_at_least(0), default=0, help="photos to skip (default 0)")
    q.add_argument("--limit", type=_at_least(0), default=100, help="photos to list (default 100)")
    q.add_argument("--json", action="store_true", help="print as JSON: {total, photos}")
    q.set_defaults(func=cmd_ls)

    q = sub.add_parser("parts", help="k-means parts of a photo, or recurring parts of the collection",
                       description="Cluster patch features: one photo's parts (a label per patch, drawn with --out), or "
                                   "with --collection the collection's recurring parts, each with the photos where it covers most.")
    q.add_argument("index", help="index directory")
    q.add_argument("query", nargs="?", default=None, help="photo (path), or a photo id with --id")
    q.add_argument("--id", action="store_true", help="QUERY is the id of an indexed photo")
    q.add_argument("--k", type=_at_least(2), default=5, help="number of parts (default 5)")
    q.add_argument("--collection", action="store_true", help="parts of the whole collection (a sample of its patches)")
    q.add_argument("--sample", type=_at_least(1), default=200_000, help="patches sampled for --collection (default 200000)")
    q.add_argument("--search", type=int, default=None, metavar="PART", help="with --collection: photos containing part PART, ranked")
    q.add_argument("--top", type=_at_least(1), default=10, help="results for --search (default 10)")
    q.add_argument("--out", default=None, help="photo: overlay PNG to write; --collection: folder for exemplar crops + parts.json")
    q.add_argument("--json", action="store_true", help="print as JSON")
    query_flags(q)
    q.set_defaults(func=cmd_parts)

    q = sub.add_parser("serve", help="HTTP API and web page over an index",
                       description="Serve the index over HTTP: the web page at /, the API documented at /docs. "
                                   "Write routes (add photos, delete) need DINOSEARCH_TOKEN.")
    q.add_argument("index", help="index directory (may not exist yet: add a folder from the page)")
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=int, default=8000)
    query_flags(q)
    q.add_argument("--workers", type=_at_least(0), default=1, help="decode processes of index jobs")
    q.add_argument("--max-upload-mb", type=int, default=32, help="largest accepted upload (default 32 MiB)")
    q.add_argument("--commit-every", type=_at_least(1), default=200, help="photos between an index job's commits (default 200)")
    q.add_argument("--compact-every", type=float, default=0.0, metavar="SECONDS",
                   help="merge small segments in a background thread this often (default 0: never; `dinosearch compact`)")
    q.add_argument("--upload-timeout", type=float, default=30.0, help="seconds an upload may stall before it is dropped (default 30)")
    q.add_argument("--max-megapixels", type=float, default=150, help="larger photos are refused, in uploads and index jobs (default 150)")
    q.add_argument("--store", default=None, metavar="URI", help="the vector store to search (default: the one the index was built with)")
    q.add_argument("--max-upload-megapixels", type=float, default=40.0,
                   help="largest upload in pixels for formats decoded whole (PNG, WebP, TIFF, HEIF, progressive JPEG; default 40); "
                        "baseline JPEGs are decoded at reduced size and may have up to 150 MP")
    q.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests with this Host name (repeatable; by default only the --host names are answered, against DNS rebinding)")
    q.add_argument("--allowed-root", action="append", default=[], metavar="DIR",
                   help="index jobs may only add folders below DIR (repeatable; default: any folder)")
    q.add_argument("--watch", action="append", default=[], metavar="FOLDER",
                   help="keep the index in step with FOLDER (repeatable): an index job at start, then one for each burst of changes")
    q.add_argument("--watch-interval", type=float, default=60.0,
                   help="with --watch, where the OS cannot watch a folder (inotify limit): seconds between scans (default 60)")
    q.set_defaults(func=cmd_serve)

    q = sub.add_parser("classify", help="top labels of a photo by the index's classifier",
                       description="Class tags of a photo with probabilities, by the classifier that tagged the index.")
    q.add_argument("index", help="index directory")
    q.add_argument("photo", help="photo (path)")
    q.add_argument("--classifier", default=None, help="hub id or directory (default: the index's classifier)")
    q.add_argument("--top", type=_at_least(1), default=5, help="how many labels (default 5)")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(func=cmd_classify)

    q = sub.add_parser("build-index", help="rebuild the FAISS indexes for size: train, fill shards, merge on disk",
                       description="Choose index kinds from the vector count and a memory budget (exact -> IVF-Flat -> "
                                   "IVF-PQ), train on a sample, fill shards in parallel and merge their inverted lists "
                                   "into one on-disk file (faiss.contrib.ondisk) that searches memory-map.")
    q.add_argument("index", help="index directory")
    q.add_argument("--kind", default=None, help="FAISS factory string for the global index (default: by size and --memory)")
    q.add_argument("--patch-kind", default=None, help="FAISS factory string for the patch index (default: by size and --memory)")
    q.add_argument("--memory", default="8GB", help="memory budget for both indexes, e.g. 8GB (default 8GB)")
    q.add_argument("--shards", type=_at_least(1), default=4, help="shards filled in parallel before the merge (default 4)")
    q.add_argument("--workers", type=_at_least(1), default=2, help="threads filling shards (default 2)")
    q.set_defaults(func=cmd_build_index)

    q = sub.add_parser("compact", help="merge small segments and drop deleted vectors (kinds chosen by size)",
                       description="Merge the index's small segments (and those holding many deleted vectors) into one "
                                   "sealed segment per kind: exact while small, then HNSW for global vectors and IVF "
                                   "(list count grown with the data) for patches, trained on a bounded sample. "
                                   "Indexing goes on meanwhile; only the final switch takes the writer's lock.")
    q.add_argument("index", help="index directory")
    q.add_argument("--all", action="store_true", help="merge every segment into one")
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(func=cmd_compact)

    q = sub.add_parser("verify", help="check an index: catalog, segments and deletions against each other",
                       description="Check the live commit: the catalog (SQLite's check, ids, where each photo's vectors "
                                   "are), every segment file against its checksum and the catalog; exit 0 if it is "
                                   "whole, 1 with each problem named. --repair removes unfinished segments, converts "
                                   "an index of the old snapshot format, and drops a damaged segment (its photos are "
                                   "embedded again by the next `index` run).")
    q.add_argument("index", help="index directory")
    q.add_argument("--repair", action="store_true", help="fix what is safe to fix")
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(func=cmd_verify)

    q = sub.add_parser("duplicates", help="groups of exact copies, edited copies (same shot) and similar shots",
                       description="Find duplicate groups: candidates from the global index, verified on patch grids "
                                   "(crops, resizes, flips and 90-degree rotations), each group with its kind and the "
                                   "photo to keep. Nothing is deleted; --move-to moves the other copies (dry run "
                                   "unless --apply), with a manifest for --undo.")
    q.add_argument("index", help="index directory")
    q.add_argument("--kind", choices=["exact", "edited", "similar"], default=None, help="only groups of this kind")
    q.add_argument("--threshold", type=_unit, default=0.3,
                   help="verified score (share of the overlap whose patches agree) a pair needs to be linked (default 0.3; "
                        "edited from 0.6)")
    q.add_argument("-k", type=_at_least(1), default=16, help="neighbours per photo from the global index (default 16)")
    q.add_argument("--min-cosine", type=_unit, default=0.5, help="global cosine floor of a candidate pair (default 0.5)")
    q.add_argument("--nprobe", type=_at_least(1), default=64, help="IVF lists searched per photo, for IVF global indexes (default 64)")
    q.add_argument("--json", action="store_true", help="print as JSON (wins over --csv; move reports included)")
    q.add_argument("--csv", action="store_true", help="print as CSV, one row per photo")
    q.add_argument("--move-to", default=None, metavar="DIR", help="move every copy but the kept one into DIR (a dry run without --apply)")
    q.add_argument("--apply", action="store_true", help="with --move-to: really move (never over a file), writing a manifest")
    q.add_argument("--undo", default=None, metavar="MANIFEST", help="move the files of a --move-to manifest back (or of the newest manifest in a --move-to DIR)")
    q.set_defaults(func=cmd_duplicates)

    q = sub.add_parser("info", help="what an index holds", description="Model, counts, sizes, index kinds and failed files of an index.")
    q.add_argument("index", help="index directory")
    q.add_argument("--failed", action="store_true", help="list every failed file")
    q.add_argument("--json", action="store_true", help="print as JSON")
    q.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        import faiss  # noqa: F401  (one of two wheels, chosen by an extra: say which, not a traceback)
    except ImportError:
        print("dinosearch: error: FAISS is not installed: install dinosearch with an extra, "
              "pip install '.[cpu]' (or '.[gpu]' on a CUDA machine; `make setup` does it)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Milvus Lite's embedded gRPC server logs a traceback for each RPC it does not implement (pymilvus probes some)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
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
    except OSError as e:  # the last resort at the edge: a read-only disk, a permission, a name too long
        where = f": {e.filename}" if e.filename else ""
        print(f"dinosearch: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinosearch: interrupted; committed work is kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
