"""Random-weight DINOv2 model directories built from configs, loaded like a user's local model."""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = {
    # name: (hidden, layers, heads, mlp)
    "tiny": (32, 2, 2, 64),
    "small": (384, 12, 6, 1536),  # facebook/dinov2-small
    "small-1": (384, 1, 6, 1536),  # dinov2-small's widths with one layer: the same vectors' shapes, ~12x faster
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
    _save_dinov2_processor(out)
    return out


def _save_dinov2_processor(out: Path) -> None:
    """The image processor facebook/dinov2-* ship with (resize 256, centre crop 224, ImageNet mean/std)."""
    import json

    cfg = {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=1))


def save_random_classifier(out: str | Path, labels: list[str], *, seed: int = 0, arch: str = "tiny") -> Path:
    """A ViT image classifier with random weights and the given labels, saved like a hub model
    (arch "base": the sizes of google/vit-base-patch16-224)."""
    import json

    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    sizes = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072) if arch == "base" else \
        dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = ViTConfig(**sizes, image_size=224, patch_size=16, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={lab: i for i, lab in enumerate(labels)})
    out = Path(out)
    ViTForImageClassification(cfg).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 224},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_normalize": True, "do_resize": True}))
    return out


SAM_ARCHITECTURES = {
    # name: (vision hidden, layers, heads, global attention layers, prompt/decoder width)
    "tiny": (32, 2, 2, (1,), 32),
    "base": (768, 12, 12, (2, 5, 8, 11), 256),  # facebook/sam-vit-base
}


def save_random_sam(out: str | Path, arch: str = "tiny", *, seed: int = 0) -> Path:
    """A SAM model with random weights and SAM's own preprocessing config, saved like a hub model."""
    import json

    import torch
    from transformers import SamConfig, SamModel

    hidden, layers, heads, global_attn, width = SAM_ARCHITECTURES[arch]
    torch.manual_seed(seed)
    cfg = SamConfig(
        vision_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, output_channels=width,
                           global_attn_indexes=list(global_attn), num_pos_feats=width // 2, initializer_range=0.02),
        prompt_encoder_config=dict(hidden_size=width),
        mask_decoder_config=dict(hidden_size=width, iou_head_hidden_dim=width,
                                 **({} if arch == "base" else dict(mlp_dim=64, num_attention_heads=2))),
    )
    out = Path(out)
    SamModel(cfg).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SamImageProcessor", "do_resize": True, "size": {"longest_edge": 1024},
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "do_pad": True, "pad_size": {"height": 1024, "width": 1024}, "mask_size": {"longest_edge": 256}}))
    return out
