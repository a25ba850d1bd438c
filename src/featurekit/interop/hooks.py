"""Other libraries' names for places in a model, as featurekit sites (`models/sites.py`: `resid_post.6`, ...).

TransformerLens hook names (SAELens, Gemma Scope, dictionary_learning's configs) and the module paths sparsify
hooks (`layers.6`, `layers.6.mlp`, `h.6.mlp`, ...). A name with no featurekit site (e.g. `hook_resid_mid`,
TransformerLens's pre-norm `hook_mlp_in`) gives None: the dictionary still loads, its file keeps the original name.
"""

from __future__ import annotations

import re

#: TransformerLens `blocks.L.<hook>` → featurekit site kind
_TL_HOOKS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
    "ln2.hook_normalized": "mlp_in",  # the MLP's input after the pre-MLP norm (TransformerLens's hook_mlp_in is before it)
    "mlp.hook_post": "mlp_hidden",
    "attn.hook_z": "attn_z",
}
_SITE_TO_TL = {kind: hook for hook, kind in _TL_HOOKS.items()}
_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: a module path's layer container, as HF models name it (Llama/Gemma `model.layers`, GPT-2 `transformer.h`, NeoX)
_MODULE = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_MODULE_KIND = {"mlp": "mlp", "self_attn": "attn", "attn": "attn", "attention": "attn"}


def site_from_hook(hook_name: str | None) -> str | None:
    """`blocks.6.hook_resid_post` → `resid_post.6`; None when featurekit has no such site."""
    m = _TL.match(hook_name or "")
    if m is None or m.group(2) not in _TL_HOOKS:
        return None
    return f"{_TL_HOOKS[m.group(2)]}.{m.group(1)}"


def hook_from_site(site: str | None) -> str | None:
    """`resid_post.6` → `blocks.6.hook_resid_post` (the inverse of `site_from_hook`); None for other sites."""
    kind, _, layer = (site or "").partition(".")
    if kind not in _SITE_TO_TL or not layer.isdigit():
        return None
    return f"blocks.{layer}.{_SITE_TO_TL[kind]}"


def sites_from_hookpoint(hookpoint: str | None, transcoder: bool) -> tuple[str | None, str | None]:
    """A sparsify hookpoint → (site, output_site). sparsify reads a module's output, a transcoder its input and
    output: `layers.6` → resid_post.6; `layers.6.mlp` → mlp_out.6 (SAE) or (mlp_in.6, mlp_out.6) (transcoder);
    `layers.6.self_attn` → attn_out.6. (None, None) for any other module."""
    m = _MODULE.match(hookpoint or "")
    if m is None:
        return None, None
    layer, part = m.group(1), _MODULE_KIND.get(m.group(2) or "")
    if part is None:  # the whole block: resid_pre → resid_post
        return (f"resid_pre.{layer}", f"resid_post.{layer}") if transcoder else (f"resid_post.{layer}", None)
    if transcoder:
        return (f"mlp_in.{layer}", f"mlp_out.{layer}") if part == "mlp" else (None, f"{part}_out.{layer}")
    return f"{part}_out.{layer}", None


def hookpoint_from_site(site: str | None, output_site: str | None = None) -> str | None:
    """The sparsify hookpoint (Llama/Gemma module names, `layers.L[.mlp]`) of a featurekit site; None where
    sparsify cannot hook it (it reads module outputs, and a transcoder's input must be that module's input)."""
    kind, _, layer = (site or "").partition(".")
    if not layer.isdigit():
        return None
    if output_site is not None:
        pairs = {("mlp_in", "mlp_out"): f"layers.{layer}.mlp", ("resid_pre", "resid_post"): f"layers.{layer}"}
        return pairs.get((kind, output_site.partition(".")[0])) if output_site.partition(".")[2] == layer else None
    return {"resid_post": f"layers.{layer}", "mlp_out": f"layers.{layer}.mlp", "attn_out": f"layers.{layer}.self_attn"}.get(kind)
