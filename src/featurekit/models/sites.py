"""Sites: named places in a transformer where activations are read (capture) or written (splice, steer).

A site name is ``<kind>.<layer>``, ``layer`` a 0-based block index. Every kind is a (B, T, d) tensor:

==============  ============================================================================
kind            meaning (same for every family; the table below says which module it is)
==============  ============================================================================
``resid_pre``   the residual stream entering block L (= ``output_hidden_states[L]``)
``resid_post``  the residual stream leaving block L (= ``output_hidden_states[L+1]`` except
                that HF replaces the last entry by the final-normed state)
``mlp_in``      the input of the MLP module (after the pre-MLP norm in pre-norm models)
``mlp_hidden``  the MLP neurons: the input of the MLP's down/output projection
``mlp_out``     the MLP contribution, just before it is added to the residual
``attn_z``      per-head attention outputs, heads concatenated: the input of the output projection
``attn_out``    the attention contribution, just before it is added to the residual
==============  ============================================================================

Which module and side ("input" = its first argument, "output" = its return value or the first
element of a returned tuple) each kind is, per family, relative to block ``L``:

* **llama** (Llama, SmolLM, Mistral, Qwen2, Gemma 1; block ``model.layers[L]``):
  resid_pre/resid_post = block input/output; mlp_in = ``mlp`` input (= ``post_attention_layernorm``
  output); mlp_hidden = ``mlp.down_proj`` input (= act(gate) * up); mlp_out = ``mlp`` output;
  attn_z = ``self_attn.o_proj`` input; attn_out = ``self_attn.o_proj`` output.
* **gemma** (Gemma 2 / Gemma 3, which wrap both sublayers in extra norms; ``model.layers[L]``):
  as llama, except mlp_in = ``mlp`` input (= ``pre_feedforward_layernorm`` output),
  attn_out = ``post_attention_layernorm`` output and mlp_out = ``post_feedforward_layernorm``
  output, i.e. what is actually added to the residual.
* **gpt2** (``transformer.h[L]``): mlp_in = ``mlp`` input (= ``ln_2`` output); mlp_hidden =
  ``mlp.c_proj`` input; mlp_out = ``mlp`` output; attn_z / attn_out = ``attn.c_proj`` input / output.
* **neox** (GPT-NeoX / Pythia, ``gpt_neox.layers[L]``): mlp_in = ``mlp`` input (with the parallel
  residual this is ``post_attention_layernorm(resid_pre)``); mlp_hidden = ``mlp.dense_4h_to_h``
  input; mlp_out = ``mlp`` output; attn_z / attn_out = ``attention.dense`` input / output.
* **bert** (post-norm encoder, ``encoder.layer[L]``): resid_pre / resid_post = layer input / output
  (after the output LayerNorm); mlp_in = ``intermediate`` input (= the attention sublayer's
  normed output); mlp_hidden = ``output.dense`` input (= ``intermediate`` output);
  mlp_out = ``output.dense`` output and attn_out = ``attention.output.dense`` output, both
  *before* the residual add and LayerNorm (the contribution, as for the other families);
  attn_z = ``attention.output.dense`` input.
* **moex** (featurekit's own small LM, ``featurekit.models.moexlm``, model_type ``featurekit_moex``;
  ``blocks[L]``): mlp_in = ``mlp`` input (= ``ln2`` output); mlp_hidden = ``mlp.down`` input: the
  dense MLP's neurons, or for an MoE the (B, T, experts × expert width) gated expert units of the
  layer read as one wide MLP (zero for the experts a token was not routed to); mlp_out = ``mlp``
  output; attn_z / attn_out = ``attn.proj`` input / output.

Vision transformers (pre-norm; the tokens are CLS, if any, then the image patches row by row; see
`featurekit.vision`):

* **dinov2** (HF Dinov2Model and featurekit's embedded ViT, ``encoder.layer[L]``): mlp_in = ``mlp``
  input (= ``norm2`` output); mlp_hidden = ``mlp.fc2`` input; attn_z = ``attention.o_proj`` input
  (``attention.output.dense`` in the embedded model and before transformers 5); attn_out / mlp_out =
  ``layer_scale1`` / ``layer_scale2`` output (after the layer scale: what is added to the residual).
* **vit** (HF ViTModel, ``layers[L]``; ``encoder.layer[L]`` before transformers 5): mlp_in / mlp_out =
  ``mlp`` input / output, mlp_hidden = ``mlp.fc2`` input, attn_z / attn_out = ``attention.o_proj``
  input / output (before transformers 5 the bert names: ``intermediate``, ``output.dense``,
  ``attention.output.dense``); pre-norm, so resid_post is the block output before any norm.
* **clip_vision** (CLIPVisionModel, SiglipVisionModel: ``encoder.layers[L]``, inside ``vision_model``
  before transformers 5):
  mlp_in = ``mlp`` input; mlp_hidden = ``mlp.fc2`` input; mlp_out = ``mlp`` output;
  attn_z / attn_out = ``self_attn.out_proj`` input / output.

Dropout after the projections is the identity in eval mode, so the projection outputs above are
exactly the values added to the residual (gemma/bert: before their norms as stated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featurekit.errors import FeaturekitError

KINDS: tuple[str, ...] = ("resid_pre", "resid_post", "mlp_in", "mlp_hidden", "mlp_out", "attn_z", "attn_out")

FAMILY_OF_MODEL_TYPE: dict[str, str] = {
    "llama": "llama", "smollm": "llama", "mistral": "llama", "qwen2": "llama",
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma",
    "gpt2": "gpt2", "gpt_neox": "neox", "bert": "bert", "featurekit_moex": "moex",
    "dinov2": "dinov2", "vit": "vit", "clip_vision_model": "clip_vision", "siglip_vision_model": "clip_vision",
}
VISION_FAMILIES: frozenset[str] = frozenset({"dinov2", "vit", "clip_vision"})  #: their input is pixel_values

_BLOCK = {"resid_pre": ("", "input"), "resid_post": ("", "output")}
_LLAMA = {**_BLOCK, "mlp_in": ("mlp", "input"), "mlp_hidden": ("mlp.down_proj", "input"),
          "mlp_out": ("mlp", "output"), "attn_z": ("self_attn.o_proj", "input"),
          "attn_out": ("self_attn.o_proj", "output")}
_GEMMA_SANDWICH = {**_LLAMA, "mlp_out": ("post_feedforward_layernorm", "output"),
                   "attn_out": ("post_attention_layernorm", "output")}
_GPT2 = {**_BLOCK, "mlp_in": ("mlp", "input"), "mlp_hidden": ("mlp.c_proj", "input"),
         "mlp_out": ("mlp", "output"), "attn_z": ("attn.c_proj", "input"), "attn_out": ("attn.c_proj", "output")}
_NEOX = {**_BLOCK, "mlp_in": ("mlp", "input"), "mlp_hidden": ("mlp.dense_4h_to_h", "input"),
         "mlp_out": ("mlp", "output"), "attn_z": ("attention.dense", "input"),
         "attn_out": ("attention.dense", "output")}
_BERT = {**_BLOCK, "mlp_in": ("intermediate", "input"), "mlp_hidden": ("output.dense", "input"),
         "mlp_out": ("output.dense", "output"), "attn_z": ("attention.output.dense", "input"),
         "attn_out": ("attention.output.dense", "output")}
_MOEX = {**_BLOCK, "mlp_in": ("mlp", "input"), "mlp_hidden": ("mlp.down", "input"), "mlp_out": ("mlp", "output"),
         "attn_z": ("attn.proj", "input"), "attn_out": ("attn.proj", "output")}
# Vision tables: "a|b" names alternatives, the first that exists wins (transformers 5 renamed the modules)
_DINOV2 = {**_BLOCK, "mlp_in": ("mlp", "input"), "mlp_hidden": ("mlp.fc2", "input"),
           "mlp_out": ("layer_scale2", "output"), "attn_z": ("attention.o_proj|attention.output.dense", "input"),
           "attn_out": ("layer_scale1", "output")}
_VIT = {**_BLOCK, "mlp_in": ("mlp|intermediate", "input"), "mlp_hidden": ("mlp.fc2|output.dense", "input"),
        "mlp_out": ("mlp|output.dense", "output"), "attn_z": ("attention.o_proj|attention.output.dense", "input"),
        "attn_out": ("attention.o_proj|attention.output.dense", "output")}
_CLIP_VISION = {**_BLOCK, "mlp_in": ("mlp", "input"), "mlp_hidden": ("mlp.fc2", "input"), "mlp_out": ("mlp", "output"),
                "attn_z": ("self_attn.out_proj", "input"), "attn_out": ("self_attn.out_proj", "output")}

# family -> (path of the block list inside the body model, site table)
_LAYOUTS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "llama": ("layers", _LLAMA), "gemma": ("layers", _GEMMA_SANDWICH), "gpt2": ("h", _GPT2),
    "neox": ("layers", _NEOX), "bert": ("encoder.layer", _BERT), "moex": ("blocks", _MOEX),
    "dinov2": ("encoder.layer", _DINOV2), "vit": ("layers|encoder.layer", _VIT),
    "clip_vision": ("encoder.layers", _CLIP_VISION),
}

_GRAMMAR = ("a site is '<kind>.<layer>' with kind one of " + ", ".join(KINDS)
            + " and layer a 0-based block index, e.g. 'resid_post.6' or 'mlp_hidden.0'")


@dataclass(frozen=True)
class Site:
    """A parsed site name: ``kind`` (one of KINDS) and ``layer`` (0-based block index)."""

    kind: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"


@dataclass(frozen=True)
class HookPoint:
    """Where a site lives: read/write the ``side`` ("input" or "output") of ``module`` in ``block``."""

    module: nn.Module
    side: str
    block: nn.Module


def parse_site(s: str | Site) -> Site:
    """Parse ``'<kind>.<layer>'`` into a Site; a bad name raises FeaturekitError showing the grammar."""
    if isinstance(s, Site):
        return s
    m = re.fullmatch(r"([a-z_]+)\.(\d+)", str(s).strip())
    if not m or m.group(1) not in KINDS:
        raise FeaturekitError(f"bad site name {s!r}: {_GRAMMAR}.")
    return Site(m.group(1), int(m.group(2)))


def detect_family(config: Any) -> str:
    """Map an HF config's ``model_type`` to a featurekit family; unknown types raise FeaturekitError."""
    model_type = getattr(config, "model_type", None)
    family = FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        supported = ", ".join(sorted(FAMILY_OF_MODEL_TYPE))
        raise FeaturekitError(
            f"unsupported model type {model_type!r}: featurekit has site resolvers for model types "
            f"{supported}. Use one of these architectures, or add a resolver in featurekit/models/sites.py.")
    return family


def unwrap(model: Any) -> nn.Module:
    """Accept a LoadedModel or an HF module; return the HF module."""
    return model if isinstance(model, nn.Module) else model.model


def body_model(model: Any) -> nn.Module:
    """The transformer body without the LM head (``model.base_model`` for HF models)."""
    m = unwrap(model)
    body = getattr(m, "base_model", m)
    if not any(hasattr(body, path.split(".")[0]) for path in _LAYOUTS[family_of(m)][0].split("|")):
        for inner in ("language_model", "vision_model"):  # multimodal wrappers (Gemma 3 with vision); CLIP/SigLIP vision towers
            if hasattr(body, inner):
                return getattr(body, inner)
    return body


def family_of(model: Any) -> str:
    """The family of an HF model (from its config's model_type)."""
    return detect_family(unwrap(model).config)


def blocks(model: Any) -> nn.ModuleList:
    """The list of transformer blocks (layers) of the model."""
    m = unwrap(model)
    body = body_model(m)
    return _submodule(body, _LAYOUTS[family_of(m)][0])


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``; ``path`` may name alternatives "a|b" (the first that exists)."""
    options = path.split("|")
    for option in options[:-1]:
        try:
            return root.get_submodule(option)
        except AttributeError:
            continue
    return root.get_submodule(options[-1])


def _table(model: Any) -> dict[str, tuple[str, str]]:
    family = family_of(model)
    table = _LAYOUTS[family][1]
    if family == "gemma" and not hasattr(blocks(model)[0], "post_feedforward_layernorm"):
        table = _LLAMA  # Gemma 1 has no sandwich norms
    return table


def n_layers(model: Any) -> int:
    return len(blocks(model))


def valid_sites(model: Any) -> list[str]:
    """Every site name of the model: each kind at each layer, grouped by layer."""
    return [f"{kind}.{layer}" for layer in range(n_layers(model)) for kind in KINDS]


def _valid_summary(model: Any) -> str:
    return _summary(family_of(model), n_layers(model))


def _summary(family: str, n: int) -> str:
    return (f"valid sites for this {family} model are <kind>.<layer> with kind one of "
            f"{', '.join(KINDS)} and layer 0..{n - 1} ({n * len(KINDS)} sites, e.g. 'resid_post.{n // 2}')")


def check_site(config: Any, site: str | Site) -> Site:
    """Check ``site`` against an HF config alone (family, ``num_hidden_layers``), before any weights
    load; return the parsed Site. A bad name, an unknown family or a layer out of range raises the
    FeaturekitError that ``resolve`` gives on the loaded model."""
    family = detect_family(config)
    n = int(config.get_text_config().num_hidden_layers)
    try:
        parsed = parse_site(site)
    except FeaturekitError as e:
        raise FeaturekitError(f"{e} For this model, {_summary(family, n)}.") from None
    if parsed.kind not in _LAYOUTS[family][1]:
        raise FeaturekitError(f"site kind {parsed.kind!r} has no resolver for {family} models: {_summary(family, n)}.")
    if parsed.layer >= n:
        raise FeaturekitError(f"site {str(parsed)!r} is out of range: {_summary(family, n)}.")
    return parsed


def resolve(model: Any, site: str | Site) -> HookPoint:
    """Map a site to its HookPoint; an unknown site or a layer out of range raises FeaturekitError."""
    try:
        parsed = parse_site(site)
    except FeaturekitError as e:
        raise FeaturekitError(f"{e} For this model, {_valid_summary(model)}.") from None
    layers = blocks(model)
    if parsed.layer >= len(layers):
        raise FeaturekitError(f"site {str(parsed)!r} is out of range: {_valid_summary(model)}.")
    block = layers[parsed.layer]
    path, side = _table(model)[parsed.kind]
    return HookPoint(_submodule(block, path) if path else block, side, block)


def d_model(model: Any) -> int:
    config = unwrap(model).config
    return int(config.get_text_config().hidden_size)


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if hasattr(module, "nx"):  # HF Conv1D (GPT-2): weight is (in, out)
        return int(module.nx)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[1])
    raise FeaturekitError(f"cannot tell the input width of {type(module).__name__}; capture the site to see it.")


def n_heads(model: Any) -> int:
    """Number of query heads (the blocks of an ``attn_z`` site: heads × head_dim)."""
    config = unwrap(model).config.get_text_config()
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads:
        raise FeaturekitError(f"{type(config).__name__} does not say how many attention heads the model has")
    return int(heads)


def site_dim(model: Any, site: str | Site) -> int:
    """Width d of the (B, T, d) activation at ``site``."""
    point = resolve(model, site)
    if parse_site(site).kind in ("mlp_hidden", "attn_z"):
        return _in_features(point.module)
    return d_model(model)
