"""The DINOv2 backbone through the real loading path: tiny random-weight models saved to disk."""

from __future__ import annotations

import time

import numpy as np
import pytest

from indexer.embedder import (
    Embedder,
    EmbedderConfig,
    choose_device,
    choose_precision,
    cpu_has_native_bf16,
    load_backbone,
)
from indexer.errors import ConfigError, WeightsUnavailable
from indexer.testing import save_random_model


def _pixels(n: int, res: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def test_shapes_and_normalisation(embedder):
    out = embedder.embed(_pixels(3))
    assert out.cls.shape == (3, 32) and out.patches.shape == (3, 16, 16, 32)
    assert np.allclose(np.linalg.norm(out.cls, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(out.patches, axis=-1), 1, atol=1e-5)


def test_batching_does_not_change_vectors(embedder):
    x = _pixels(4)
    together = embedder.embed(x)
    alone = embedder.embed(x[2:3])
    assert np.allclose(together.cls[2], alone.cls[0], atol=1e-5)
    assert np.allclose(together.patches[2], alone.patches[0], atol=1e-4)


def test_cls_and_patches_are_the_models_own_outputs(embedder):
    """CLS = layer-normed token 0 of last_hidden_state, patches = the tokens after it, in row-major order."""
    import torch

    x = _pixels(1)
    out = embedder.embed(x)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(embedder.mean).view(1, 3, 1, 1), torch.tensor(embedder.std).view(1, 3, 1, 1)
    with torch.no_grad():
        h = embedder.model(pixel_values=(t - mean) / std).last_hidden_state[0]
    h = torch.nn.functional.normalize(h, dim=-1).numpy()
    assert np.allclose(out.cls[0], h[0], atol=1e-4)
    assert np.allclose(out.patches[0, 2, 5], h[1 + 2 * 16 + 5], atol=1e-4)


def test_register_tokens_are_dropped(tmp_path):
    d = save_random_model(tmp_path / "reg", "tiny", registers=4)
    e = Embedder(EmbedderConfig(model=str(d), device="cpu"))
    assert e.num_registers == 4 and e.model_type == "dinov2_with_registers"
    out = e.embed(_pixels(2))
    assert out.patches.shape == (2, 16, 16, 32)


def test_other_resolution(tiny_model):
    e = Embedder(EmbedderConfig(model=str(tiny_model), resolution=112, device="cpu"))
    assert e.embed(_pixels(1, 112)).patches.shape == (1, 8, 8, 32)
    with pytest.raises(ConfigError, match="multiple of the patch size 14; try 112"):
        Embedder(EmbedderConfig(model=str(tiny_model), resolution=110, device="cpu"))


def test_bf16_weights_on_cpu_forced_agree_with_fp32(tiny_model):
    """bf16 weights on CPU run on every x86 CPU (slowly without native bf16): this machine runs the bf16 path too."""
    import torch

    fp32 = Embedder(EmbedderConfig(model=str(tiny_model), device="cpu", precision="fp32"))
    bf16 = Embedder(EmbedderConfig(model=str(tiny_model), device="cpu", precision="bf16"))
    assert bf16.precision == "bf16" and next(bf16.model.parameters()).dtype == torch.bfloat16
    x = _pixels(2)
    a, b = fp32.embed(x), bf16.embed(x)
    assert a.cls.dtype == b.cls.dtype == np.float32
    assert np.allclose(np.linalg.norm(b.cls, axis=1), 1, atol=1e-5)
    assert (a.cls * b.cls).sum(1).min() > 0.999 and (a.patches * b.patches).sum(-1).min() > 0.99
    assert float(bf16.fingerprint() @ fp32.fingerprint()) > 0.99  # an index built in bf16 opens in fp32's check


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_native_bf16_detection(tiny_model, monkeypatch, native):
    """The auto choice with native bf16 reported present and absent: no stopwatch, the same every time."""
    monkeypatch.setenv("DINOSEARCH_CPU_BF16", "1" if native else "0")
    assert cpu_has_native_bf16() is native
    chosen = {Embedder(EmbedderConfig(model=str(tiny_model), device="cpu")).precision for _ in range(3)}
    assert chosen == {"bf16" if native else "fp32"}


def test_native_bf16_detection_reads_cpu_flags(monkeypatch):
    monkeypatch.delenv("DINOSEARCH_CPU_BF16", raising=False)
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


@pytest.mark.parametrize("device, native, cuda_bf16, expected", [
    ("cpu", False, False, "fp32"),
    ("cpu", True, False, "bf16"),
    ("cuda", False, True, "bf16"),
    ("cuda:1", False, False, "fp16"),  # a GPU without bf16 (pre-Ampere)
    ("mps", True, False, "fp16"),
])
def test_auto_precision_by_device(device, native, cuda_bf16, expected):
    assert choose_precision("auto", device, native_bf16=native, cuda_bf16=cuda_bf16) == expected


def test_index_precision_is_kept_and_a_different_one_refused():
    # a later run, query or server on an index embeds with the index's precision, whatever this machine would pick
    assert choose_precision("auto", "cpu", native_bf16=False, index_precision="bf16") == "bf16"
    assert choose_precision("auto", "cpu", native_bf16=True, index_precision="fp32") == "fp32"
    assert choose_precision("bf16", "cpu", native_bf16=False, index_precision="bf16") == "bf16"
    assert choose_precision("auto", "cuda", native_bf16=False, cuda_bf16=True, index_precision="fp16") == "fp16"
    assert choose_precision("auto", "cpu", native_bf16=False, index_precision="fp16") == "fp32"  # GPU-built, no CPU fp16
    with pytest.raises(ConfigError, match="built with precision bf16; --precision fp32"):
        choose_precision("fp32", "cpu", native_bf16=True, index_precision="bf16")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        choose_precision("fp16", "cpu", native_bf16=True)
    with pytest.raises(ConfigError, match="unknown precision"):
        choose_precision("int8", "cpu", native_bf16=True)


@pytest.mark.parametrize("requested, cuda, mps, count, expected", [
    ("auto", True, True, 2, "cuda"),
    ("auto", False, True, 0, "mps"),
    ("auto", False, False, 0, "cpu"),
    ("cpu", True, True, 1, "cpu"),
    ("cuda:1", True, False, 2, "cuda:1"),
    ("mps", False, True, 0, "mps"),
])
def test_device_choice(requested, cuda, mps, count, expected):
    assert choose_device(requested, cuda=cuda, mps=mps, cuda_count=count) == expected


@pytest.mark.parametrize("requested, cuda, mps, count, message", [
    ("cuda", False, False, 0, "no CUDA GPU"),
    ("cuda:2", True, False, 2, "has 2 CUDA GPU"),
    ("mps", False, False, 0, "MPS is not available"),
    ("bogus", True, True, 1, "unknown device 'bogus'"),
    ("meta", False, False, 0, "unsupported device"),
])
def test_device_choice_refused(requested, cuda, mps, count, message):
    with pytest.raises(ConfigError, match=message):
        choose_device(requested, cuda=cuda, mps=mps, cuda_count=count)


def test_offline_hub_id_fails_fast_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        load_backbone("facebook/dinov2-small")
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert "\n" not in msg and "--model DIR" in msg and "facebook/dinov2-small" in msg


def test_missing_directory_and_wrong_model_type(tmp_path):
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        load_backbone(str(tmp_path / "nope" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsUnavailable, match="no config.json"):
        load_backbone(str(tmp_path / "empty"))
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "vit")
    with pytest.raises(WeightsUnavailable, match="'vit' model; dinosearch needs DINOv2"):
        load_backbone(str(tmp_path / "vit"))
