"""The frozen parts of a transformer for one prompt: norms with their denominators fixed, attention with
its patterns fixed. With both frozen, everything outside the MLPs is an affine map of the residual stream.

    norm(x)  = (x − [mean x]) · s · w + b      s = 1/√(mean(x²)+ε) (RMSNorm) or 1/√(var x + ε) (LayerNorm),
                                                 read from the clean forward and then held fixed;
                                                 the mean is subtracted for LayerNorm only (a linear map)
    attn(h)  = concat_heads(P_h · (h W_V,h + b_V,h)) W_O + b_O   P_h: the clean forward's pattern

Families (`models.sites` names them): **llama** (Llama, SmolLM, Mistral, Qwen2 blocks:
`input_layernorm`, `self_attn.{v_proj,o_proj}`, `post_attention_layernorm`, the body's `norm`) and
**gpt2** (`ln_1`, `attn.{c_attn,c_proj}` as HF Conv1D, `ln_2`, the body's `ln_f`). Others raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FeaturekitError
from ..models.sites import blocks, body_model, family_of, unwrap

SUPPORTED = ("llama", "gpt2")


@dataclass
class FrozenNorm:
    """A norm whose denominator is fixed per position: `scale` (T,) = 1/denominator of the clean input."""

    scale: Tensor
    weight: Tensor | None
    bias: Tensor | None
    center: bool

    def __call__(self, x: Tensor) -> Tensor:
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        y = x * self.scale[:, None]
        if self.weight is not None:
            y = y * self.weight
        return y if self.bias is None else y + self.bias

    def vjp(self, g: Tensor) -> Tensor:
        """The transposed linear map: the gradient at the input from the gradient g (B, T, d) at the output."""
        if self.weight is not None:
            g = g * self.weight
        g = g * self.scale[:, None]
        return g - g.mean(-1, keepdim=True) if self.center else g


@dataclass
class FrozenAttention:
    """Attention with fixed patterns (H, T, T): linear in its input apart from the V and O biases."""

    pattern: Tensor
    w_v: Tensor            # (n_kv_heads · head_dim, d)
    b_v: Tensor | None
    w_o: Tensor            # (d, n_heads · head_dim)
    b_o: Tensor | None
    n_heads: int
    n_kv_heads: int

    def __call__(self, h: Tensor) -> Tensor:
        B, T, _ = h.shape
        v = nn.functional.linear(h, self.w_v, self.b_v).view(B, T, self.n_kv_heads, -1).transpose(1, 2)
        v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # grouped-query: heads share K/V
        z = (self.pattern @ v).transpose(1, 2).reshape(B, T, -1)
        return nn.functional.linear(z, self.w_o, self.b_o)

    def vjp(self, g: Tensor) -> Tensor:
        """The transposed linear map: the gradient at the input h from the gradient g (B, T, d) at the output."""
        B, T, _ = g.shape
        gz = (g @ self.w_o).view(B, T, self.n_heads, -1).transpose(1, 2)         # (B, H, T, head_dim)
        gv = self.pattern.transpose(-1, -2) @ gz                                # z_h = P_h v_h
        gv = gv.view(B, self.n_kv_heads, self.n_heads // self.n_kv_heads, T, -1).sum(2)  # heads sharing a K/V head
        return gv.transpose(1, 2).reshape(B, T, -1) @ self.w_v


@dataclass
class FrozenLayer:
    ln1: FrozenNorm
    attn: FrozenAttention
    ln2: FrozenNorm


def check_family(model: Any) -> str:
    family = family_of(model)
    if family not in SUPPORTED:
        raise FeaturekitError(f"circuits support the llama family (Llama, SmolLM, Mistral, Qwen2) and GPT-2 models; this "
                              f"model is in the {family!r} family, whose norms and attention the local replacement "
                              "model does not freeze yet")
    return family


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float()


def freeze_norm(module: nn.Module, x: Tensor) -> FrozenNorm:
    """The norm `module` frozen at its clean input x (T, d)."""
    x = x.float()
    if isinstance(module, nn.LayerNorm):
        scale = torch.rsqrt(x.var(-1, unbiased=False) + module.eps)
        return FrozenNorm(scale, _f32(module.weight), _f32(module.bias), center=True)
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    if eps is None or not type(module).__name__.endswith("RMSNorm"):
        raise FeaturekitError(f"cannot freeze a {type(module).__name__}: circuits know nn.LayerNorm and Llama-style RMSNorm")
    scale = torch.rsqrt(x.pow(2).mean(-1) + eps)
    return FrozenNorm(scale, _f32(getattr(module, "weight", None)), _f32(getattr(module, "bias", None)), center=False)


def freeze_attention(family: str, module: nn.Module, pattern: Tensor) -> FrozenAttention:
    """The attention `module` with its clean pattern (H, T, T)."""
    pattern = pattern.detach().float()
    if family == "llama":
        n_heads = module.config.num_attention_heads
        n_kv = module.config.num_key_value_heads
        return FrozenAttention(pattern, _f32(module.v_proj.weight), _f32(module.v_proj.bias),
                               _f32(module.o_proj.weight), _f32(module.o_proj.bias), n_heads, n_kv)
    d = module.c_attn.weight.shape[0]  # GPT-2 Conv1D: weight (in, out), y = x W + b; c_attn outputs [q | k | v]
    w_v, b_v = module.c_attn.weight[:, 2 * d:].T, module.c_attn.bias[2 * d:]
    return FrozenAttention(pattern, _f32(w_v), _f32(b_v), _f32(module.c_proj.weight.T), _f32(module.c_proj.bias),
                           module.num_heads, module.num_heads)


def block_parts(family: str, block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(first norm, attention, pre-MLP norm) of one block."""
    if family == "llama":
        return block.input_layernorm, block.self_attn, block.post_attention_layernorm
    return block.ln_1, block.attn, block.ln_2


def final_norm(model: Any) -> nn.Module:
    body = body_model(model)
    return body.norm if family_of(model) == "llama" else body.ln_f


def unembedding(model: Any) -> tuple[Tensor, Tensor | None]:
    """(W_U (V, d), b_U or None) of the LM head, in float32."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise FeaturekitError("this model has no LM head (get_output_embeddings() is None); attribution graphs "
                              "explain logits, so load the causal-LM form of the model")
    return _f32(head.weight), _f32(getattr(head, "bias", None))


def n_blocks(model: Any) -> int:
    return len(blocks(model))
