"""Tiny random-weight Hugging Face vision transformers (ViT, DINOv2, CLIP vision, SigLIP vision), saved as
local folders with a preprocessor_config.json: nothing is downloaded."""

import json
from pathlib import Path

import torch
import transformers as tf

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, initializer_range=0.2)
BUILDERS = {
    "vit": lambda: tf.ViTModel(tf.ViTConfig(**COMMON), add_pooling_layer=False),
    "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**{k: v for k, v in COMMON.items() if k != "intermediate_size"},
                                                     mlp_ratio=2, layerscale_value=0.5)),
    "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**COMMON)),
    "siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**COMMON)),
}
FAMILY = {"vit": "vit", "dinov2": "dinov2", "clip": "clip_vision", "siglip": "clip_vision"}


def write_tiny_vit(root: Path, name: str) -> Path:
    """root/NAME: a random model of kind NAME and its preprocessor_config.json (32 × 32 inputs)."""
    torch.manual_seed(0)
    folder = root / name
    BUILDERS[name]().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder
