"""Objects: SAM masks per photo, each cropped with its background neutralised, for DINOv2.

``SamModel`` is driven directly instead of through transformers' ``mask-generation``
pipeline: that pipeline's post-processing imports torchvision, which does not
install beside the CPU torch build this project uses, and driving the model lets
one image embedding serve every prompt (``get_image_embeddings`` once, then the
light mask decoder per batch of grid points).

Automatic masks follow SAM's own recipe: a regular grid of point prompts, three
masks per point, kept when the predicted IoU and the stability score (IoU of the
mask thresholded at +offset and -offset) pass their thresholds, then box NMS,
minimum/maximum area and at most ``max_masks`` per photo, best first. Stability
is measured on the decoder's 256x256 logits, not on upscaled masks: the same
ordering for a fraction of the work.

Geometry: SAM sees the photo resized so its longest side is 1024 (padded to a
square); masks come back at the size of the image given (the reader's
``large`` decode). Boxes are (x0, y0, x1, y1) in pixels with x1/y1 exclusive.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from indexer.embedder import gpu_autocast, load_pretrained, model_ref

DEFAULT_SEGMENTER = "facebook/sam-vit-base"
NEUTRAL = (124, 116, 104)  # ImageNet mean colour: what the backbone sees as "nothing"


@dataclass(frozen=True)
class SegmenterConfig:
    model: str = DEFAULT_SEGMENTER
    revision: str | None = None
    points_per_side: int = 8  # grid of points_per_side^2 prompts (SAM's own default is 32: 16x the decoder work)
    points_per_batch: int = 64
    min_iou: float = 0.88  # SAM's predicted IoU
    min_stability: float = 0.92
    stability_offset: float = 1.0
    nms_iou: float = 0.7  # box IoU above which the lower-scored mask is a duplicate
    min_area: float = 0.005  # fraction of the photo
    max_area: float = 0.95  # larger masks are the background
    max_masks: int = 16

    def __post_init__(self) -> None:
        from indexer.errors import ConfigError

        if not 1 <= self.points_per_side <= 128:
            raise ConfigError(f"SAM points per side must be 1..128, got {self.points_per_side}")
        if not 1 <= self.max_masks <= 256:
            raise ConfigError(f"SAM max masks must be 1..256 (objects per photo), got {self.max_masks}")
        if not 0 <= self.min_area < self.max_area <= 1:
            raise ConfigError(f"SAM areas are fractions of the photo with min < max, got {self.min_area}..{self.max_area}")
        if not 0 < self.nms_iou <= 1:
            raise ConfigError(f"SAM NMS IoU must be in (0, 1], got {self.nms_iou}")

    def settings(self) -> dict:
        """What the manifest records: another setting means the objects are made anew."""
        return {k: v for k, v in asdict(self).items() if k != "points_per_batch"}


@dataclass
class Mask:
    mask: np.ndarray  # bool [h, w], at the size of the image it was found in
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    score: float  # SAM's predicted IoU
    stability: float = 1.0

    @property
    def area(self) -> int:
        return int(self.mask.sum())


# ---------------------------------------------------------------- geometry, RLE


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box (x0, y0, x1, y1), x1/y1 exclusive, of a non-empty bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        raise ValueError("empty mask has no box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_object(image: np.ndarray, mask: np.ndarray, side: int, fill: tuple[int, int, int] = NEUTRAL) -> np.ndarray:
    """The object under ``mask``: its box cut out, everything outside the mask set to ``fill``,
    padded to a square (centred, aspect kept) and resized to side x side. uint8 [side, side, 3]."""
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    x0, y0, x1, y1 = mask_box(mask)
    crop = image[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = fill
    h, w = crop.shape[:2]
    s = max(h, w)
    square = np.empty((s, s, 3), np.uint8)
    square[:] = fill
    top, left = (s - h) // 2, (s - w) // 2
    square[top:top + h, left:left + w] = crop
    if s == side:
        return square
    return np.asarray(Image.fromarray(square).resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8).copy()


def rle_encode(mask: np.ndarray) -> dict:
    """COCO-style uncompressed RLE (column-major runs, starting with a run of 0s)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, not {h}x{w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((h, w), order="F")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a [N, 4] against every box in b [M, 4] (x0, y0, x1, y1)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order:
        if not keep or box_iou(boxes[i:i + 1], boxes[keep]).max() <= iou:
            keep.append(int(i))
    return keep


# ---------------------------------------------------------------- SAM


class Segmenter:
    """SAM masks for photos: automatic (point grid), or from one point or one box."""

    def __init__(self, config: SegmenterConfig = SegmenterConfig(), *, device: torch.device, precision: str = "fp32"):
        from transformers import SamModel

        from indexer.classifier import processor_config

        self.config = config = replace(config, model=model_ref(config.model))  # a directory: absolute
        self.model = load_pretrained(config.model, config.revision, SamModel, types=("sam",), what="a SAM segmentation model",
                                     flag="--sam-model")
        pc = processor_config(self.model, config.model)
        self.side = int(pc.get("size", {}).get("longest_edge") or self.model.config.vision_config.image_size)
        mean = pc.get("image_mean", [0.485, 0.456, 0.406])
        std = pc.get("image_std", [0.229, 0.224, 0.225])
        self.device, self.precision = device, precision
        self.model.to(device).eval()
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self._lock = threading.Lock()

    def _scale(self, h: int, w: int) -> float:
        return self.side / max(h, w)

    def _embed(self, image: np.ndarray) -> torch.Tensor:
        """SAM's preprocessing (longest side to 1024, normalise, pad bottom/right) and image encoder."""
        h, w = image.shape[:2]
        s = self._scale(h, w)
        nh, nw = int(h * s + 0.5), int(w * s + 0.5)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self._mean) / self._std
        x = F.pad(x, (0, self.side - nw, 0, self.side - nh))
        with gpu_autocast(self.device, self.precision):
            return self.model.get_image_embeddings(x)

    def _masks(self, emb: torch.Tensor, **prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder logits [P, 3, 256, 256] and predicted IoUs [P, 3] for a batch of prompts."""
        with gpu_autocast(self.device, self.precision):
            out = self.model(image_embeddings=emb, multimask_output=True, **prompt)
        return out.pred_masks[0].float(), out.iou_scores[0].float()

    def _upscale(self, logits: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
        """Low-res logits [N, 256, 256] -> bool masks [N, h, w] at the image's own size."""
        h, w = hw
        s = self._scale(h, w)
        nh, nw = int(h * s + 0.5), int(w * s + 0.5)
        low = logits.shape[-1]
        # the low-res grid covers the padded square; keep the part over the photo, then size it to the photo
        ch, cw = max(1, round(nh * low / self.side)), max(1, round(nw * low / self.side))
        x = F.interpolate(logits[:, None, :ch, :cw], size=(h, w), mode="bilinear", align_corners=False)
        return (x[:, 0] > 0).cpu().numpy()

    def _to_model(self, xy: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Pixel coordinates in the image -> SAM's input frame."""
        return xy * self._scale(*hw)

    @torch.inference_mode()
    def automatic(self, image: np.ndarray) -> list[Mask]:
        """All objects SAM finds from a grid of point prompts, best first (uint8 [h, w, 3] in)."""
        c = self.config
        h, w = image.shape[:2]
        with self._lock:
            emb = self._embed(image)
            n = c.points_per_side
            g = (np.arange(n) + 0.5) / n
            pts = np.stack(np.meshgrid(g * w, g * h), -1).reshape(-1, 2)
            cand_logits, cand_scores, cand_stab = [], [], []
            for i in range(0, len(pts), c.points_per_batch):
                p = torch.from_numpy(self._to_model(pts[i:i + c.points_per_batch], (h, w))).float().to(self.device)
                labels = torch.ones(1, len(p), 1, dtype=torch.long, device=self.device)
                logits, iou = self._masks(emb, input_points=p[None, :, None, :], input_labels=labels)
                logits, iou = logits.flatten(0, 1), iou.flatten()
                hi = (logits > c.stability_offset).sum((-1, -2)).float()
                lo = (logits > -c.stability_offset).sum((-1, -2)).float()
                stab = hi / lo.clamp(min=1)
                ok = (iou >= c.min_iou) & (stab >= c.min_stability)
                cand_logits.append(logits[ok])
                cand_scores.append(iou[ok])
                cand_stab.append(stab[ok])
        logits = torch.cat(cand_logits)
        if not len(logits):
            return []
        scores, stab = torch.cat(cand_scores).cpu().numpy(), torch.cat(cand_stab).cpu().numpy()
        masks: list[Mask] = []
        area_lo, area_hi = c.min_area * h * w, c.max_area * h * w
        for j in np.argsort(-scores, kind="stable"):  # upscale best first, in small chunks (memory)
            m = self._upscale(logits[int(j)][None], (h, w))[0]
            a = m.sum()
            if a == 0 or a < area_lo or a > area_hi:
                continue
            cand = Mask(m, mask_box(m), float(scores[j]), float(stab[j]))
            if masks and box_iou(np.array([cand.box], float), np.array([k.box for k in masks], float)).max() > c.nms_iou:
                continue  # greedy NMS in score order
            masks.append(cand)
            if len(masks) >= c.max_masks:
                break
        return masks

    def _best(self, emb: torch.Tensor, hw: tuple[int, int], **prompt) -> Mask | None:
        logits, iou = self._masks(emb, **prompt)
        j = int(iou[0].argmax())
        m = self._upscale(logits[0, j][None], hw)[0]
        return Mask(m, mask_box(m), float(iou[0, j])) if m.any() else None

    @torch.inference_mode()
    def from_point(self, image: np.ndarray, x: float, y: float) -> Mask | None:
        """The best of SAM's three masks for a click at (x, y) in the image's pixels."""
        hw = image.shape[:2]
        with self._lock:
            emb = self._embed(image)
            p = torch.tensor(self._to_model(np.array([[x, y]], float), hw), dtype=torch.float32, device=self.device)
            return self._best(emb, hw, input_points=p[None, None], input_labels=torch.ones(1, 1, 1, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def from_box(self, image: np.ndarray, box: tuple[float, float, float, float]) -> Mask | None:
        """The best mask for a box prompt (x0, y0, x1, y1) in the image's pixels."""
        hw = image.shape[:2]
        with self._lock:
            emb = self._embed(image)
            b = self._to_model(np.array(box, float).reshape(2, 2), hw).reshape(1, 1, 4)
            return self._best(emb, hw, input_boxes=torch.tensor(b, dtype=torch.float32, device=self.device))

    def main_object(self, image: np.ndarray) -> Mask:
        """The query photo's main object: the largest confident automatic mask, else the whole photo."""
        masks = self.automatic(image)
        if masks:
            return max(masks, key=lambda m: m.area * m.score)
        h, w = image.shape[:2]
        return Mask(np.ones((h, w), bool), (0, 0, w, h), 0.0)
