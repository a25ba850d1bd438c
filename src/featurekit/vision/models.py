"""Load a vision model for featurekit: the embedded DINOv2-S/14 or a Hugging Face vision transformer.

``load_vision_model(name)``: ``"dinov2-s-focus"`` (embedded, `onnx_weights`), or a local folder (or Hub id,
where the Hub answers) holding a ViTModel, Dinov2Model, CLIPVisionModel or SiglipVisionModel. Its sites
are the text models' names (`models.sites`: resid_post.L, mlp_hidden.L, attn_out.L, ...) over the
model's tokens: the CLS token first where the model has one (``n_prefix`` = 1; 0 for SigLIP), then
the patches row by row. ``preprocess`` says how pixels are prepared (size, mean, std), from the
folder's ``preprocessor_config.json`` where there is one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from featurekit.errors import FeaturekitError
from featurekit.models.sites import FAMILY_OF_MODEL_TYPE, VISION_FAMILIES, detect_family, n_layers
from featurekit.vision.onnx_weights import EMBEDDED_PREPROCESS, EMBEDDED_VISION, load_embedded_vit
from featurekit.vision.vit import VitConfig

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@dataclass
class VisionModel:
    """A vision model ready for featurekit: ``model`` (eval mode; called as ``model(pixel_values=...)``),
    ``name`` as given, ``family`` (dinov2/vit/clip_vision), ``n_layers``, ``d_model``, ``n_prefix``
    (tokens before the patches: 1 for a CLS token), ``patch_size`` and ``preprocess`` (size, mean, std)."""

    model: Any
    name: str
    family: str
    n_layers: int
    d_model: int
    n_prefix: int
    patch_size: int
    preprocess: dict = field(default_factory=dict)
    tokenizer: None = None  # the text pipeline's slot; a vision model has none

    def grid(self, size: int | None = None) -> int:
        """Patches per side for a square input of ``size`` pixels (the preprocessing's size by default)."""
        return (size or self.preprocess["size"]) // self.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's final token states (B, T, d): ``last_hidden_state``."""
        device = next(self.model.parameters()).device
        return self.model(pixel_values=pixel_values.to(device)).last_hidden_state


def is_vision_model(name: str) -> bool:
    """Whether ``name`` names a vision model: an embedded one, or a local folder whose config.json is a
    vision family's (no weights read). A Hub id is not recognised (a run takes a vision model from a local
    folder: save it there first); `load_vision_model` itself loads Hub ids."""
    if name in EMBEDDED_VISION:
        return True
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return False
        return FAMILY_OF_MODEL_TYPE.get(model_type) in VISION_FAMILIES
    return False


def load_vision_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> VisionModel:
    """Load ``name`` (module docstring) in ``dtype`` on ``device``."""
    if name in EMBEDDED_VISION:
        model = load_embedded_vit(name)
        preprocess = dict(EMBEDDED_PREPROCESS)
    else:
        model, preprocess = _load_hf(name)
    model = model.to(device=device, dtype=dtype).eval()
    config = model.config
    family = _check_family(name, config)
    n_prefix = 0 if config.model_type == "siglip_vision_model" else 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return VisionModel(model=model, name=name, family=family, n_layers=n_layers(model), d_model=int(config.hidden_size),
                       n_prefix=n_prefix, patch_size=int(config.patch_size), preprocess=preprocess)


def vision_config(name: str) -> Any:
    """The config of vision model ``name`` without its weights (to check sites before loading)."""
    if name in EMBEDDED_VISION:
        return VitConfig()
    import transformers as tf

    from featurekit.models.loading import from_hub

    path = Path(name).expanduser()
    config = (tf.AutoConfig.from_pretrained(str(path)) if path.is_dir()
              else from_hub(name, lambda **kw: tf.AutoConfig.from_pretrained(name, **kw)))
    _check_family(name, config)
    return config


def preprocess_of(name: str) -> dict:
    """The preprocessing model ``name`` expects (size, mean, std), without loading its weights."""
    if name in EMBEDDED_VISION:
        return dict(EMBEDDED_PREPROCESS)
    path = Path(name).expanduser()
    return _preprocess(vision_config(name), _preprocessor_config(path) if path.is_dir() else {})


def _preprocess(config: Any, pre: dict) -> dict:
    size = pre.get("crop_size") or pre.get("size") or config.image_size
    if isinstance(size, dict):  # {"height": h, "width": w} or {"shortest_edge": s}
        size = size.get("height") or size.get("shortest_edge")
    return {"size": int(size), "mean": list(pre.get("image_mean", IMAGENET["mean"])),
            "std": list(pre.get("image_std", IMAGENET["std"]))}


def _check_family(name: str, config: Any) -> str:
    family = detect_family(config) if getattr(config, "model_type", None) in FAMILY_OF_MODEL_TYPE else None
    if family not in VISION_FAMILIES:
        raise FeaturekitError(f"{name!r} is a {getattr(config, 'model_type', '?')} model, not a vision transformer: featurekit's "
                              f"vision path takes ViTModel, Dinov2Model, CLIPVisionModel, SiglipVisionModel (a CLIP or SigLIP "
                              f"checkpoint: save its vision tower alone) or the embedded {', '.join(EMBEDDED_VISION)}")
    return family


def _load_hf(name: str) -> tuple[Any, dict]:
    """A Hugging Face vision model (AutoModel: ViTModel, Dinov2Model, CLIPVisionModel, SiglipVisionModel) and its
    preprocessing from preprocessor_config.json (else config.image_size and ImageNet mean/std)."""
    import transformers as tf

    from featurekit.models.loading import from_hub

    path = Path(name).expanduser()
    preprocess = preprocess_of(name)  # checks the family before any weights load
    # ViT's pooler is never used here, and a checkpoint saved without it would get fresh random weights on every
    # load (so another model digest each time): leave it out
    extra = {"add_pooling_layer": False} if vision_config(name).model_type == "vit" else {}
    if path.is_dir():
        return tf.AutoModel.from_pretrained(str(path), **extra), preprocess
    return from_hub(name, lambda **kw: tf.AutoModel.from_pretrained(name, **kw, **extra)), preprocess


def _preprocessor_config(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise FeaturekitError(f"{path} is not valid JSON ({err}); fix or delete it") from err
    return data if isinstance(data, dict) else {}
