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
MAX_RESOLUTION = 1036  # 2 x 518, DINOv2's largest training resolution


@dataclass(frozen=True)
class EmbedderConfig:
    model: str = "facebook/dinov2-small"  # hub id or local directory
    revision: str | None = None
    resolution: int = 224  # square input side, multiple of the patch size
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    index_precision: str | None = None  # what the index being extended or searched recorded (None: a new index)

    def __post_init__(self) -> None:
        if not 1 <= self.resolution <= MAX_RESOLUTION:
            raise ConfigError(f"--resolution must be between the patch size and {MAX_RESOLUTION} px (DINOv2 is trained at "
                              f"224 and 518; {MAX_RESOLUTION} px is already 5,476 patches a photo), got {self.resolution}")


@dataclass
class Embeddings:
    """Output for a batch of B photos: L2-normalized float32 arrays."""

    cls: np.ndarray  # [B, D]
    patches: np.ndarray  # [B, h, w, D]


def choose_device(requested: str, *, cuda: bool, mps: bool, cuda_count: int = 1) -> str:
    """The device to run on: cuda > mps > cpu for "auto", else the requested one if this machine has it.

    Pure function of what the machine offers, so every branch is tested on any machine.
    """
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not cuda:
        raise ConfigError(f"--device {requested} was asked for but no CUDA GPU is available (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= cuda_count:
        raise ConfigError(f"--device {requested} was asked for but this machine has {cuda_count} CUDA GPU(s): cuda:0..cuda:{cuda_count - 1}")
    if dev.type == "mps" and not mps:
        raise ConfigError(f"--device {requested} was asked for but MPS is not available (use --device cpu)")
    return requested


def pick_device(requested: str = "auto") -> torch.device:
    """cuda > mps > cpu unless a device is requested; a device this machine lacks is a ConfigError."""
    cuda = torch.cuda.is_available()
    return torch.device(choose_device(requested, cuda=cuda, mps=torch.backends.mps.is_available(),
                                      cuda_count=torch.cuda.device_count() if cuda else 0))


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo names of bf16 matrix instructions


def cpu_has_native_bf16() -> bool:
    """True if the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), read from its flags.

    ``DINOSEARCH_CPU_BF16=1`` or ``=0`` overrides the detection (to opt out of bf16 on such a CPU,
    or to run the bf16 path on any CPU, as the tests do).
    """
    forced = os.environ.get("DINOSEARCH_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(set(line.split(":", 1)[1].split()) & NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def keep_index_precision(requested: str, index_precision: str) -> str:
    """An index embeds with the precision it was created with; an explicit other one is a ConfigError."""
    if requested not in ("auto", index_precision):
        raise ConfigError(f"this index was built with precision {index_precision}; --precision {requested} would embed "
                          f"differently: leave --precision out (or give {index_precision}), or use a new --index")
    return index_precision


def choose_precision(requested: str, device: str, *, native_bf16: bool, cuda_bf16: bool = False,
                     index_precision: str | None = None) -> str:
    """The precision to embed with: decided once, from the device and CPU flags (never a stopwatch).

    ``index_precision`` is what an existing index recorded when it was created; every later run,
    query and server on it embeds the same way, and an explicit other ``requested`` is an error.
    auto: on CUDA bf16 where the GPU has it, else fp16; on MPS fp16; on CPU bf16 weights where the
    CPU has native bf16 instructions, else fp32. fp16 has no CPU path: an fp16 (GPU-built) index is
    queried in fp32 on a CPU.
    """
    if requested not in PRECISIONS:
        raise ConfigError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    dtype = torch.device(device).type
    if index_precision is not None:
        requested = keep_index_precision(requested, index_precision)
        if requested == "fp16" and dtype == "cpu":
            return "fp32"
    if requested == "fp16" and dtype == "cpu":
        raise ConfigError("--precision fp16 needs a GPU; on a CPU use fp32 or bf16")
    if requested != "auto":
        return requested
    if dtype == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    if dtype == "mps":
        return "fp16"
    return "bf16" if native_bf16 else "fp32"


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(model: str, flag: str) -> str:
    return (
        f"cannot load model '{model}': its weights are not in the local cache and the "
        f"Hugging Face hub cannot be reached; on a machine with network run "
        f"`hf download {model} --local-dir DIR`, copy DIR here and pass {flag} DIR"
    )


def model_ref(model: str) -> str:
    """How an index records a model: a local directory as an absolute path (found from any working
    directory later), a hub id as given."""
    local = Path(model).expanduser()
    return str(local.absolute()) if local.is_dir() else model


def gpu_autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on a GPU (cuda, mps); a no-op context on CPU, where bf16 means bf16 weights instead."""
    half = device.type in ("cuda", "mps") and precision in ("bf16", "fp16")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16, enabled=half)


def load_pretrained(model: str, revision: str | None, auto_class: type, *, types: tuple[str, ...] | None = None,
                    what: str = "DINOv2", flag: str = "--model", **load_kwargs) -> torch.nn.Module:
    """Load a transformers model by local directory or hub id, failing in one clear line.

    A hub id is looked up in the local cache first (no network at all when it is
    there); if it is not cached and the hub cannot be reached, the error says how to
    pass a local directory (with ``flag``, the option that names this model). ``types`` restricts the
    accepted config.model_type.
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
                raise WeightsUnavailable(_offline_message(model, flag)) from None
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        if types is not None and config.model_type not in types:
            raise WeightsUnavailable(f"'{model}' is a {config.model_type!r} model; dinosearch needs {what} ({', '.join(types)})")
        net = auto_class.from_pretrained(source, **load_kwargs, **kwargs)
    except WeightsUnavailable:
        raise
    except Exception as e:  # garbage weights raise what their reader raises (SafetensorError, RuntimeError, ...)
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
        self.config = config = dataclasses.replace(config, model=model_ref(config.model))
        self.model = model if model is not None else load_backbone(config.model, config.revision)
        mc = self.model.config
        self.patch_size = int(mc.patch_size)
        self.dim = int(mc.hidden_size)
        self.num_registers = int(getattr(mc, "num_register_tokens", 0) or 0)
        if config.resolution % self.patch_size or config.resolution < self.patch_size:
            raise ConfigError(
                f"resolution {config.resolution} is not a multiple of the patch size {self.patch_size}; "
                f"try {max(1, round(config.resolution / self.patch_size)) * self.patch_size}"
            )
        self.grid = config.resolution // self.patch_size
        mean, std = _preprocessing(getattr(mc, "_name_or_path", "") or config.model)
        self.device = pick_device(config.device)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.mean, self.std = tuple(mean), tuple(std)
        cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.precision = choose_precision(config.precision, str(self.device), native_bf16=cpu_has_native_bf16(),
                                          cuda_bf16=cuda_bf16, index_precision=config.index_precision)
        self.model.to(self.device)
        if self.device.type == "cpu" and self.precision == "bf16":
            self.model.to(torch.bfloat16)  # bf16 weights: faster than autocast on CPU
        self._lock = threading.Lock()  # one forward at a time: an index job and queries share the model

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

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
