"""Embedder: a DINOv2 backbone that turns pixel batches into CLS vectors and patch grids.

Loads any `transformers` DINOv2 (with or without registers) by hub id or local
directory, picks the device and precision, and embeds uint8 batches produced by
the reader. Index and query side both use this class.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from indexer.errors import ConfigError, WeightsUnavailable

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("dinov2", "dinov2_with_registers")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EmbedderConfig:
    model: str = "facebook/dinov2-small"  # hub id or local directory
    revision: str | None = None
    resolution: int = 224  # square input side, multiple of the patch size
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16


@dataclass
class Embeddings:
    """Output for a batch of B photos: L2-normalized float32 arrays."""

    cls: np.ndarray  # [B, D]
    patches: np.ndarray  # [B, h, w, D]


def pick_device(requested: str = "auto") -> torch.device:
    """cuda > mps > cpu unless a device is requested."""
    if requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--device mps was asked for but MPS is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True if the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), read from its flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(model: str) -> str:
    return (
        f"cannot load model '{model}': its weights are not in the local cache and the "
        f"Hugging Face hub cannot be reached; on a machine with network run "
        f"`hf download {model} --local-dir DIR`, copy DIR here and pass --model DIR"
    )


def gpu_autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on a GPU (cuda, mps); a no-op context on CPU, where bf16 means bf16 weights instead."""
    half = device.type in ("cuda", "mps") and precision in ("bf16", "fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16, enabled=half)


def load_pretrained(model: str, revision: str | None, auto_class: type, *, types: tuple[str, ...] | None = None,
                    what: str = "DINOv2", **load_kwargs) -> torch.nn.Module:
    """Load a transformers model by local directory or hub id, failing in one clear line.

    A hub id is looked up in the local cache first (no network at all when it is
    there); if it is not cached and the hub cannot be reached, the error says how to
    pass a local directory. ``types`` restricts the accepted config.model_type.
    """
    from transformers import AutoConfig

    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise WeightsUnavailable(f"'{local}' is a folder but has no config.json: not a transformers model directory")
        source, kwargs = str(local), {}
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise WeightsUnavailable(f"model directory '{model}' does not exist")
    else:
        source, kwargs = model, {"revision": revision}
        try:  # cached already? then no network at all
            AutoConfig.from_pretrained(model, revision=revision, local_files_only=True)
            kwargs["local_files_only"] = True
        except OSError:
            if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
                raise WeightsUnavailable(_offline_message(model)) from None
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        if types is not None and config.model_type not in types:
            raise WeightsUnavailable(f"'{model}' is a {config.model_type!r} model; dinosearch needs {what} ({', '.join(types)})")
        net = auto_class.from_pretrained(source, **load_kwargs, **kwargs)
    except WeightsUnavailable:
        raise
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsUnavailable(f"cannot load model '{model}' as {what}: {reason}") from None
    return net.eval()


def load_backbone(model: str, revision: str | None = None) -> torch.nn.Module:
    """Load a DINOv2 model by local directory or hub id, failing in one clear line."""
    from transformers import AutoModel

    # eager attention: on CPUs measured faster than sdpa for ViT-S/14 (see README)
    return load_pretrained(model, revision, AutoModel, types=SUPPORTED_TYPES, attn_implementation="eager")


def _preprocessing(model_dir: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std travel with the weights (preprocessor_config.json) when present."""
    import json

    p = Path(model_dir) / "preprocessor_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


class Embedder:
    """DINOv2 forward on batches of uint8 photos.

    The config is the only constructor argument; the model is loaded here, not at import.
    """

    def __init__(self, config: EmbedderConfig, *, model: torch.nn.Module | None = None):
        local = Path(config.model).expanduser()
        if local.is_dir():  # recorded absolute, so the index finds its model from any working directory
            config = dataclasses.replace(config, model=str(local.absolute()))
        self.config = config
        self.model = model if model is not None else load_backbone(config.model, config.revision)
        mc = self.model.config
        self.patch_size = int(mc.patch_size)
        self.dim = int(mc.hidden_size)
        self.num_registers = int(getattr(mc, "num_register_tokens", 0) or 0)
        if config.resolution % self.patch_size:
            raise ConfigError(
                f"resolution {config.resolution} is not a multiple of the patch size {self.patch_size}; "
                f"try {round(config.resolution / self.patch_size) * self.patch_size}"
            )
        self.grid = config.resolution // self.patch_size
        mean, std = _preprocessing(getattr(mc, "_name_or_path", "") or config.model)
        self.device = pick_device(config.device)
        self.precision = self._choose_precision(config.precision)
        self.model.to(self.device)
        if self.device.type == "cpu" and self.precision == "bf16":
            self.model.to(torch.bfloat16)  # bf16 weights: faster than autocast on CPU
        self._lock = threading.Lock()  # one forward at a time: an index job and queries share the model
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    def _choose_precision(self, requested: str) -> str:
        if requested not in PRECISIONS:
            raise ConfigError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
        if requested != "auto":
            return requested
        if self.device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if self.device.type == "mps":
            return "fp16"
        if not cpu_has_native_bf16():
            return "fp32"
        return self._probe_cpu_bf16()

    def _probe_cpu_bf16(self) -> str:
        """Use bf16 on this CPU only if it is faster than fp32 and agrees with it."""
        x = torch.randint(0, 256, (4, self.config.resolution, self.config.resolution, 3), dtype=torch.uint8).numpy()
        timings, outs = {}, {}
        for p in ("fp32", "bf16"):
            self.model.to(torch.float32 if p == "fp32" else torch.bfloat16)
            self.precision = p
            self._forward(x)  # warm-up
            t = time.perf_counter()
            outs[p] = self._forward(x)[0]
            timings[p] = time.perf_counter() - t
        self.model.to(torch.float32)
        cos = float((outs["fp32"] * outs["bf16"]).sum(-1).min())
        choice = "bf16" if timings["bf16"] < 0.9 * timings["fp32"] and cos >= 0.9999 else "fp32"
        log.info("bf16 probe: fp32 %.3fs, bf16 %.3fs, min cosine %.5f -> %s", timings["fp32"], timings["bf16"], cos, choice)
        return choice

    def _to_input(self, pixels: np.ndarray) -> torch.Tensor:
        assert pixels.ndim == 4 and pixels.shape[3] == 3, f"expected uint8 [B, H, W, 3], got {pixels.shape}"
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        if self.device.type == "cpu" and self.precision == "bf16":
            x = x.to(torch.bfloat16)
        return x

    def _forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._to_input(pixels)
        with torch.inference_mode(), gpu_autocast(self.device, self.precision):
            h = self.model(pixel_values=x).last_hidden_state  # [B, 1 + R + h*w, D], layer-normed
            h = torch.nn.functional.normalize(h.float(), dim=-1)
        cls = h[:, 0]
        patches = h[:, 1 + self.num_registers :]  # register tokens dropped
        b = pixels.shape[0]
        assert patches.shape[1] == self.grid * self.grid, f"expected {self.grid}x{self.grid} patches, got {patches.shape[1]}"
        return cls.cpu().numpy(), patches.reshape(b, self.grid, self.grid, self.dim).cpu().numpy()

    def embed(self, pixels: np.ndarray) -> Embeddings:
        """uint8 [B, res, res, 3] -> L2-normalized CLS [B, D] and patch grid [B, h, w, D]."""
        if pixels.shape[1:3] != (self.config.resolution, self.config.resolution):
            raise ConfigError(f"expected {self.config.resolution}px photos, got {pixels.shape[1]}x{pixels.shape[2]}")
        with self._lock:
            cls, patches = self._forward(pixels)
        return Embeddings(cls=cls, patches=patches)

    def fingerprint(self) -> np.ndarray:
        """CLS of a fixed synthetic photo: equal models with equal preprocessing give (nearly) equal vectors."""
        r = self.config.resolution
        yy, xx = np.mgrid[0:r, 0:r]
        img = np.stack([xx * 255 // r, yy * 255 // r, (xx + yy) * 127 // r], axis=-1).astype(np.uint8)
        return self.embed(img[None]).cls[0]
