"""The DINOv2 backbone through the real loading path: tiny random-weight models saved to disk."""

from __future__ import annotations

import time

import numpy as np
import pytest

from indexer.embedder import Embedder, EmbedderConfig, cpu_has_native_bf16, load_backbone
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


def test_bf16_agrees_with_fp32(tiny_model):
    fp32 = Embedder(EmbedderConfig(model=str(tiny_model), device="cpu", precision="fp32"))
    bf16 = Embedder(EmbedderConfig(model=str(tiny_model), device="cpu", precision="bf16"))
    x = _pixels(2)
    cos = (fp32.embed(x).cls * bf16.embed(x).cls).sum(1)
    assert bf16.precision == "bf16" and cos.min() > 0.999


def test_auto_precision_follows_cpu_flags(embedder):
    # without AVX512-BF16/AMX the probe is not even run: fp32
    if not cpu_has_native_bf16():
        assert embedder.precision == "fp32"
    else:
        assert embedder.precision in ("fp32", "bf16")


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
