"""Cost of class tags and SAM objects at index time, all measured in one run on this machine.

    python scripts/bench_objects.py [--n 8] [--points 4,8,16,32]

Models: architecture-exact with random weights (speed does not depend on weight
values): DINOv2-small backbone, ViT-B/16 classifier (google/vit-base-patch16-224
sizes, 1000 classes), SAM ViT-B (facebook/sam-vit-base sizes). Photos: ~1 MP JPEGs
made from the Caltech-101 sample (as scripts/bench_index.py makes them).

Prints photos/s of `index` plain, with classification and with objects (the cost
ratio against plain, same photos, same run), masks per photo, where the objects'
time goes (SAM image encoder, mask decoder, crop embedding), and the decoder's cost
by point-grid density (how the default grid was chosen).

Random weights make SAM's confidences meaningless: with the default thresholds a
random SAM keeps no mask at all, which would hide the crop-embedding cost. The
objects run therefore disables the thresholds, so every photo yields --max-masks
objects: the worst case of the per-photo budget, not a typical photo.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_index import make_photos  # noqa: E402

from indexer.classifier import Classifier, ClassifierConfig  # noqa: E402
from indexer.embedder import Embedder, EmbedderConfig  # noqa: E402
from indexer.objects import Segmenter, SegmenterConfig, crop_object  # noqa: E402
from indexer.reader import DecodeJob, FileInfo, decode_file  # noqa: E402
from indexer.runner import IndexConfig, index_folder, start_pool  # noqa: E402
from indexer.testing import save_random_classifier, save_random_model, save_random_sam  # noqa: E402


def timed_index(folder: Path, idx: Path, embedder: Embedder, **kw) -> tuple[float, object]:
    shutil.rmtree(idx, ignore_errors=True)
    cfg = IndexConfig(workers=1, progress=False, batch_size=16)
    pool = start_pool(1)
    time.sleep(1.0)  # let the worker start, as the CLI hides it behind model loading
    t = time.perf_counter()
    stats = index_folder(folder, idx, embedder, cfg, pool=pool, **kw)
    return time.perf_counter() - t, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="photos per run (default 8)")
    ap.add_argument("--max-masks", type=int, default=SegmenterConfig().max_masks)
    ap.add_argument("--points", default="4,8,16,32", help="grid densities to time the mask decoder at")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()

    work = Path(args.out or tempfile.mkdtemp(prefix="bench-objects-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, work in {work}")
    models = work / "models"
    dino = models / "dinov2-small"
    vit = models / "vit-base-patch16"
    sam = models / "sam-vit-base"
    if not dino.exists():
        save_random_model(dino, "small")
    if not vit.exists():
        save_random_classifier(vit, [f"class_{i}" for i in range(1000)], arch="base")
    if not sam.exists():
        save_random_sam(sam, "base")
    paths = make_photos(work / "photos", "1mp", args.n)
    folder = paths[0].parent

    embedder = Embedder(EmbedderConfig(model=str(dino), device="cpu"))
    clf = Classifier(ClassifierConfig(model=str(vit)), device=embedder.device, precision=embedder.precision)
    loose = dict(min_iou=-1e9, min_stability=0.0, min_area=0.0, max_area=1.0, nms_iou=1.0, max_masks=args.max_masks)
    seg = Segmenter(SegmenterConfig(model=str(sam), **loose), device=embedder.device, precision=embedder.precision)
    print(f"backbone {embedder.precision}, classifier ViT-B/16 ({sum(p.numel() for p in clf.model.parameters()) / 1e6:.0f} M params), "
          f"SAM ViT-B ({sum(p.numel() for p in seg.model.parameters()) / 1e6:.0f} M params), {args.n} photos of ~1 MP")

    # warm-up: first forwards allocate
    x = np.zeros((2, 224, 224, 3), np.uint8)
    embedder.embed(x)
    clf.classify(x)

    t_plain, s_plain = timed_index(folder, work / "idx-plain", embedder)
    t_clf, s_clf = timed_index(folder, work / "idx-classify", embedder, classifier=clf)
    t_obj, s_obj = timed_index(folder, work / "idx-objects", embedder, segmenter=seg)
    n = args.n
    print("\nindex runs (same photos, one decode worker, batch 16)")
    print(f"  plain               {n / t_plain:6.2f} photos/s  {t_plain:7.1f} s")
    print(f"  --classify          {n / t_clf:6.2f} photos/s  {t_clf:7.1f} s  cost x{t_clf / t_plain:.2f}  "
          f"(classify {s_clf.stage_seconds['classify'] / n * 1000:.0f} ms/photo)")
    print(f"  --objects           {n / t_obj:6.2f} photos/s  {t_obj:7.1f} s  cost x{t_obj / t_plain:.1f}  "
          f"{s_obj.objects / n:.1f} masks/photo")
    seg_s, emb_s = s_obj.stage_seconds["segment"], s_obj.stage_seconds["embed_objects"]
    print(f"    SAM (encoder + decoder + masks) {seg_s / n:6.2f} s/photo, crop embedding {emb_s / n:6.2f} s/photo "
          f"({emb_s / max(1, s_obj.objects) * 1000:.0f} ms/crop)")

    # where SAM's time goes, on one decoded photo
    d = decode_file(FileInfo(str(paths[0]), paths[0].stat().st_size, 0), DecodeJob(224, large_side=seg.side))
    large = d.large
    with torch.inference_mode():
        seg._embed(large)
        t = time.perf_counter()
        reps = 2
        for _ in range(reps):
            emb = seg._embed(large)
        t_enc = (time.perf_counter() - t) / reps
    print(f"\nSAM ViT-B image encoder: {t_enc:.2f} s/photo (1024x1024 input)")
    print("mask decoder by point grid (prompts = points^2, 3 masks each, batches of 64):")
    h, w = large.shape[:2]
    for pts in [int(v) for v in args.points.split(",")]:
        g = (np.arange(pts) + 0.5) / pts
        xy = np.stack(np.meshgrid(g * w, g * h), -1).reshape(-1, 2)
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(xy), 64):
                p = torch.from_numpy(seg._to_model(xy[i:i + 64], (h, w))).float()
                seg._masks(emb, input_points=p[None, :, None, :], input_labels=torch.ones(1, len(p), 1, dtype=torch.long))
        t_dec = time.perf_counter() - t
        print(f"  {pts:3d} x {pts:<3d} = {pts * pts:5d} prompts: decoder {t_dec:6.2f} s/photo, SAM total {t_enc + t_dec:6.2f} s/photo "
              f"(x{(t_enc + t_dec) / t_enc:.2f} the encoder alone)")
    masks = seg.automatic(large)
    crops = np.stack([crop_object(large, m.mask, 224) for m in masks])
    t = time.perf_counter()
    embedder.embed(crops)
    print(f"crop embedding: {len(crops)} crops in {time.perf_counter() - t:.2f} s (DINOv2-small, one batch)")


if __name__ == "__main__":
    main()
