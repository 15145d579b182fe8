"""Retrieval quality of dinosearch on a labelled photo set, and ANN recall of each index kind.

    python scripts/eval_retrieval.py DATASET --model MODEL [--layout labels|holidays|ukbench|folders]

Dataset layouts:
  labels    DATASET/labels.csv with `filename,label` rows and the photos in DATASET/images/
            (or beside the csv): category retrieval, every photo is a query, the others
            with its label are relevant. data/caltech101-sample is in this layout.
  holidays  INRIA Holidays naming: 100000.jpg, 100001.jpg, ...; a group is the number // 100,
            its first photo (xxxx00) is the query, the rest of the group is relevant.
  ukbench   ukbench00000.jpg ...: groups of 4 consecutive numbers; every photo is a query,
            the 3 others of its group are relevant.
  folders   one sub-folder per group; the first photo (sorted) is the query.

Prints mAP, recall@1/5/10 and precision@1/5/10 of global search (the query itself
excluded), then recall@10 of every index kind against exact search on the same vectors.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer import catalog  # noqa: E402
from indexer.embedder import Embedder, EmbedderConfig  # noqa: E402
from indexer.faissio import make_index  # noqa: E402
from indexer.reader import EXTENSIONS  # noqa: E402
from indexer.runner import IndexConfig, index_folder  # noqa: E402
from search import Engine  # noqa: E402
from search.metrics import knn_recall, summarize  # noqa: E402


def load_groups(root: Path, layout: str) -> tuple[Path, dict[str, str], set[str]]:
    """(photo folder, relative photo path -> group, relative paths used as queries)."""
    if layout == "labels":
        csv_path = root / "labels.csv"
        folder = root / "images" if (root / "images").is_dir() else root
        with open(csv_path, newline="") as f:
            group = {row["filename"]: row["label"] for row in csv.DictReader(f)}
        return folder, group, set(group)
    photos = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if layout == "folders":
        group = {p: str(Path(p).parent) for p in photos}
        first: dict[str, str] = {}
        for p in photos:
            first.setdefault(group[p], p)
        return root, group, set(first.values())
    number = {p: int(re.findall(r"\d+", Path(p).stem)[-1]) for p in photos}
    if layout == "holidays":
        group = {p: str(n // 100) for p, n in number.items()}
        return root, group, {p for p, n in number.items() if n % 100 == 0}
    if layout == "ukbench":
        group = {p: str(n // 4) for p, n in number.items()}
        return root, group, set(photos)
    raise SystemExit(f"unknown layout {layout!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--model", required=True, help="hub id or local model directory")
    ap.add_argument("--layout", default="labels", choices=["labels", "holidays", "ukbench", "folders"])
    ap.add_argument("--index", type=Path, default=None, help="index directory (default out/eval-<dataset>)")
    ap.add_argument("--resolution", type=int, default=224)
    a = ap.parse_args()

    folder, group, queries = load_groups(a.dataset, a.layout)
    idx = a.index or REPO / "out" / f"eval-{a.dataset.name}"
    embedder = Embedder(EmbedderConfig(model=a.model, resolution=a.resolution))
    stats = index_folder(folder, idx, embedder, IndexConfig(progress=True))
    print(f"indexed {stats.indexed} new, {stats.unchanged} unchanged, {stats.failed} failed ({idx})")
    engine = Engine(idx, embedder=embedder)
    rows = catalog.indexed_paths(engine.db)
    by_rel = {}
    for i, p in rows:
        rel = str(Path(os.fsdecode(p)).relative_to(folder.absolute()))
        if rel in group:
            by_rel[rel] = i
    members = defaultdict(set)
    for rel, i in by_rel.items():
        members[group[rel]].add(i)
    runs = []
    t = time.perf_counter()
    for rel in sorted(queries & set(by_rel)):
        qid = by_rel[rel]
        relevant = members[group[rel]] - {qid}
        if not relevant:
            continue
        ranked = [h.photo_id for h in engine.similar(qid, k=len(by_rel)) if h.photo_id != qid]
        runs.append((ranked, relevant))
    secs = time.perf_counter() - t
    s = summarize(runs)
    print(f"\nglobal search, {int(s['queries'])} queries over {len(by_rel)} photos ({a.layout} layout, model {a.model}):")
    print("  " + "  ".join(f"{k} {v:.3f}" for k, v in s.items() if k != "queries"))
    print(f"  {secs / max(1, len(runs)) * 1000:.1f} ms per query (full ranking)")

    # ANN recall of every index kind on these very vectors
    ids = np.array(sorted(by_rel.values()), np.int64)
    xb = np.stack([engine.global_index.reconstruct(int(i)) for i in ids]).astype(np.float32)
    n, d = xb.shape
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    k = min(10, n)
    _, truth = flat.search(xb, k)
    nlist = max(4, 1 << round(np.log2(np.sqrt(n))))
    print(f"\nANN recall@{k} vs exact on the same {n} global vectors:")
    for kind in ["Flat", "SQ8", f"IVF{nlist},Flat", f"IVF{nlist},SQ8", f"IVF{nlist},PQ{d // 8}", "HNSW32"]:
        try:
            index = make_index(kind, d, xb) if not kind.startswith("HNSW") else faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
            if kind.startswith("HNSW"):
                index.add(xb)
                _, found = index.search(xb, k)
            else:
                index.add_with_ids(xb, np.arange(n, dtype=np.int64))
                ivf = faiss.try_extract_index_ivf(index)
                if ivf is not None:
                    ivf.nprobe = min(ivf.nlist, 32)
                _, found = index.search(xb, k)
            print(f"  {kind:<20} {knn_recall(found, truth, k):.3f}")
        except Exception as e:  # a kind that cannot be trained on this few vectors
            print(f"  {kind:<20} n/a ({str(e).splitlines()[0][:80]})")


if __name__ == "__main__":
    main()
