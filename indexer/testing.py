"""Random-weight DINOv2 model directories built from configs, loaded like a user's local model."""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = {
    # name: (hidden, layers, heads, mlp)
    "tiny": (32, 2, 2, 64),
    "small": (384, 12, 6, 1536),  # facebook/dinov2-small
    "base": (768, 12, 12, 3072),  # facebook/dinov2-base
    "large": (1024, 24, 16, 4096),
}


def save_random_model(out: str | Path, arch: str = "tiny", *, registers: int = 0, seed: int = 0, patch_size: int = 14) -> Path:
    """Save a DINOv2 (or DINOv2-with-registers) model with random weights to ``out``."""
    import torch
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    hidden, layers, heads, mlp = ARCHITECTURES[arch]
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
              patch_size=patch_size, image_size=518)
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    out = Path(out)
    model.save_pretrained(out)
    return out
