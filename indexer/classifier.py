"""Classifier: class tags for photos from any transformers image-classification model (default ViT).

Loads like the backbone (hub id or local directory, the same clear error offline),
runs on the backbone's device and precision, and classifies the very uint8 batches
the reader produced for the backbone, so tagging adds no second decode.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from indexer.embedder import gpu_autocast, load_pretrained, model_ref

DEFAULT_CLASSIFIER = "google/vit-base-patch16-224"


@dataclass(frozen=True)
class ClassifierConfig:
    model: str = DEFAULT_CLASSIFIER
    revision: str | None = None
    top_k: int = 5


def processor_config(model: torch.nn.Module, name: str) -> dict:
    """preprocessor_config.json of a local model directory or a cached hub model ({} if none)."""
    path = Path(getattr(model.config, "_name_or_path", "") or name)
    if path.is_dir():
        p = path / "preprocessor_config.json"
        return json.loads(p.read_text()) if p.is_file() else {}
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(name, "preprocessor_config.json")
        return json.loads(Path(p).read_text()) if isinstance(p, str) else {}
    except Exception:
        return {}


class Classifier:
    """Top-k labels with probabilities for batches of uint8 photos."""

    def __init__(self, config: ClassifierConfig, *, device: torch.device, precision: str = "fp32"):
        from transformers import AutoModelForImageClassification

        self.config = config = dataclasses.replace(config, model=model_ref(config.model))  # a directory: absolute
        self.model = load_pretrained(config.model, config.revision, AutoModelForImageClassification, what="an image classifier",
                                     flag="--classifier")
        pc = processor_config(self.model, config.model)
        size = pc.get("size", {})
        side = size.get("height") or size.get("shortest_edge") or getattr(self.model.config, "image_size", 224)
        self.side = int(side if isinstance(side, int) else side[0])
        mean = pc.get("image_mean", [0.5, 0.5, 0.5])
        std = pc.get("image_std", [0.5, 0.5, 0.5])
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.device, self.precision = device, precision
        self.model.to(device)
        if device.type == "cpu" and precision == "bf16":
            self.model.to(torch.bfloat16)
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self._lock = threading.Lock()

    def classify(self, pixels: np.ndarray) -> list[list[tuple[str, float]]]:
        """uint8 [B, H, W, 3] (whole photos, as the reader makes them) -> per photo the top-k (label, probability)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.side or x.shape[-2] != self.side:
            x = torch.nn.functional.interpolate(x, size=(self.side, self.side), mode="bilinear", antialias=True, align_corners=False)
        x = (x - self._mean) / self._std
        if self.device.type == "cpu" and self.precision == "bf16":
            x = x.to(torch.bfloat16)
        with self._lock, torch.inference_mode(), gpu_autocast(self.device, self.precision):
            probs = self.model(pixel_values=x).logits.float().softmax(-1)
        k = min(self.config.top_k, probs.shape[-1])
        p, i = probs.topk(k, dim=-1)
        return [[(self.labels[j], round(float(q), 6)) for q, j in zip(pr.tolist(), ir.tolist())] for pr, ir in zip(p, i)]
