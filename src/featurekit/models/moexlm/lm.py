"""A small GPT-style causal LM whose MLPs are one of four kinds, at equal activated parameters.

``LMConfig.mlp`` picks the MLP of every block: ``dense_gelu``, ``dense_relu``, ``switch`` (learned
softmax router, GELU experts, gates not renormalised) or ``moex`` (ReLU experts, sparsity-aware router).

**Activated parameters** are the MLP parameters one token uses (``activated_mlp_params``): dense
``2·d·H + H + d`` (up and down weights, their biases); an MoE with k selected experts of width D uses
``k·(2·d·D + D) + d`` (the k experts' encoders, biases and decoders, the shared output bias), so with
``expert_hidden = H / top_k`` (the default) every kind activates the same ``2·d·H + H + d``. The Switch
router's ``d·M`` weights per block come on top (reported separately, not equalised: 512 against 33,088 at
d=64, H=256, M=8); the MoE-X router has none (it reads the experts' weights). Attention, embeddings and norms are the same
for every kind.

The model reads like a Hugging Face causal LM where featurekit needs it: ``model(input_ids=...,
attention_mask=...)`` returns an object with ``.logits``; ``config.model_type`` is ``featurekit_moex``
with ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``; blocks are ``blocks[L]`` with
``attn.proj`` and ``mlp.up``/``mlp.down``, so featurekit's sites (``mlp_hidden.L`` = the input of
``mlp.down``: the dense neurons, or MoE-X's M·D gated expert units) resolve on it (models/sites.py).

**Upcycling** (``upcycle``): an MoE-X model is built from a trained dense model by copying everything
but the MLPs, and giving every expert a copy of the dense MLP (encoder and decoder), with Gaussian
noise of ``noise`` × the encoder weights' standard deviation added to each expert's encoder so that the
sparsity router can tell the experts apart. With renormalised gates (they sum to 1) and ReLU in both,
the upcycled model computes the dense model's function up to that noise. It needs expert_hidden = H.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import FeaturekitError
from .layers import DenseMLP, MoE, moex, switch_moe

KINDS = ("dense_gelu", "dense_relu", "switch", "moex")
MODEL_TYPE = "featurekit_moex"


@dataclass
class LMConfig:
    vocab_size: int
    mlp: str = "moex"
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 128
    mlp_hidden: int = 0          # H; 0 = 4·d_model
    n_experts: int = 8
    top_k: int = 1
    expert_hidden: int = 0       # D; 0 = H / top_k (equal activated parameters)
    router_temperature: float = 1.0
    router_estimate: str = "expert"  # MoE-X's estimate of each expert's active units: "expert" or "unit" (layers.py)
    switch_act: str = "gelu"
    aux_weight: float = 0.01     # weight of the load-balancing loss (MoE kinds)

    def __post_init__(self) -> None:
        if self.mlp not in KINDS:
            raise FeaturekitError(f"unknown mlp kind {self.mlp!r}: use one of {', '.join(KINDS)}")
        if self.vocab_size < 2 or self.d_model < 1 or self.n_layer < 1 or self.seq_len < 1:
            raise FeaturekitError(f"vocab_size ≥ 2, d_model, n_layer and seq_len ≥ 1 needed, got {self.vocab_size}, "
                                  f"{self.d_model}, {self.n_layer}, {self.seq_len}")
        if self.d_model % self.n_head:
            raise FeaturekitError(f"d_model={self.d_model} must be a multiple of n_head={self.n_head}")
        if self.hidden % self.top_k and not self.expert_hidden:
            raise FeaturekitError(f"mlp_hidden={self.hidden} is not a multiple of top_k={self.top_k}: set expert_hidden "
                                  f"yourself (equal activated parameters need top_k·expert_hidden = mlp_hidden)")

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.d_model

    @property
    def expert_width(self) -> int:
        return self.expert_hidden or self.hidden // self.top_k

    # what featurekit's site resolver reads (the names of a Hugging Face config)
    model_type = MODEL_TYPE

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    def get_text_config(self) -> LMConfig:
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FeaturekitError(f"unknown LM config keys {unknown}: known are {sorted(known)}")
        return cls(**d)


def make_mlp(cfg: LMConfig) -> nn.Module:
    if cfg.mlp == "dense_gelu":
        return DenseMLP(cfg.d_model, cfg.hidden, "gelu")
    if cfg.mlp == "dense_relu":
        return DenseMLP(cfg.d_model, cfg.hidden, "relu")
    if cfg.mlp == "switch":
        return switch_moe(cfg.d_model, cfg.n_experts, cfg.expert_width, cfg.top_k, cfg.switch_act)
    return moex(cfg.d_model, cfg.n_experts, cfg.expert_width, cfg.top_k, cfg.router_temperature, cfg.router_estimate)


def activated_mlp_params(cfg: LMConfig) -> dict[str, int]:
    """Per-token MLP parameters of one block: ``experts`` (what is equalised across kinds), ``router``."""
    d = cfg.d_model
    if cfg.mlp.startswith("dense"):
        return {"experts": 2 * d * cfg.hidden + cfg.hidden + d, "router": 0}
    width = cfg.expert_width
    return {"experts": cfg.top_k * (2 * d * width + width) + d, "router": d * cfg.n_experts if cfg.mlp == "switch" else 0}


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # its input is the attn_z site

    def forward(self, x: Tensor, keep: Tensor | None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if keep is None:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(z.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.d_model), make_mlp(cfg)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.mlp(self.ln2(x))


@dataclass
class LMOutput:
    logits: Tensor


class MoexLM(nn.Module):
    """Token and position embeddings, pre-norm blocks, final norm, head tied to the token embedding."""

    causal_lm = True  # its logits predict the next token (models.loading.has_lm_head)

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> LMOutput:
        """Logits (B, T, vocab). ``attention_mask`` (B, T; 1 = token) hides padding keys; extra keywords
        that Hugging Face callers pass (``use_cache``) are ignored."""
        b, t = input_ids.shape
        if t > self.config.seq_len:
            raise FeaturekitError(f"a sequence of {t} tokens is longer than this model's seq_len={self.config.seq_len}; "
                                  f"cut the input to at most {self.config.seq_len} tokens")
        x = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        keep = None
        if attention_mask is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            keep = causal & attention_mask.bool()[:, None, None, :]
            keep = keep | torch.eye(t, dtype=torch.bool, device=x.device)  # a padding query attends to itself: no NaN
        for block in self.blocks:
            x = block(x, keep)
        return LMOutput(self.ln_f(x) @ self.tok.weight.T)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (as a Hugging Face model reports it)."""
        return self.tok.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok.weight.device

    def get_output_embeddings(self) -> nn.Embedding:
        """The unembedding (tied: the token embedding, weight (vocab, d)), as a Hugging Face LM names it."""
        return self.tok

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 1, do_sample: bool = False, attention_mask: Tensor | None = None,
                 **_: Any) -> Tensor:
        """Greedy continuation (B, T + max_new_tokens), as a Hugging Face LM's ``generate`` with ``do_sample=False``
        (the explorer's steering calls it); the context is cut to the last ``seq_len`` tokens. Sampling options are
        ignored; ``do_sample=True`` is refused."""
        if do_sample:
            raise FeaturekitError("MoexLM.generate is greedy only: call it with do_sample=False")
        ids = input_ids
        for _ in range(max_new_tokens):
            window = ids[:, -self.config.seq_len:]
            mask = None if attention_mask is None else attention_mask[:, -window.shape[1]:]
            nxt = self(window, attention_mask=mask).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
        return ids

    def aux_loss(self) -> Tensor:
        """Sum of the MoE blocks' load-balancing losses of the last forward pass (0 for dense)."""
        losses = [blk.mlp.aux_loss for blk in self.blocks if isinstance(blk.mlp, MoE)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def loss(self, input_ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(cross-entropy in nats per token, load-balancing loss)."""
        logits = self(input_ids).logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce, self.aux_loss()


def upcycle(dense: MoexLM, cfg: LMConfig, noise: float = 0.01, seed: int = 0) -> MoexLM:
    """An MoE-X model whose experts start as copies of ``dense``'s MLPs (module docstring)."""
    src = dense.config
    if not src.mlp.startswith("dense"):
        raise FeaturekitError(f"upcycling starts from a dense model; this one's mlp is {src.mlp!r}")
    if cfg.mlp != "moex":  # Switch's gates are not renormalised: p_j·E(x) would not start as the dense function
        raise FeaturekitError(f"upcycling makes an MoE-X model: set mlp to 'moex', not {cfg.mlp!r}")
    same = ("vocab_size", "d_model", "n_layer", "n_head", "seq_len")
    if any(getattr(src, k) != getattr(cfg, k) for k in same) or cfg.expert_width != src.hidden:
        raise FeaturekitError(f"upcycling copies the dense MLP into every expert: {', '.join(same)} must match the dense "
                              f"model's and expert_hidden must equal its mlp_hidden ({src.hidden}), got expert_hidden="
                              f"{cfg.expert_width}")
    model = MoexLM(cfg)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing = model.load_state_dict(state, strict=False).missing_keys
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk, dense_blk in zip(model.blocks, dense.blocks):
            up, down = dense_blk.mlp.up, dense_blk.mlp.down
            m = blk.mlp.n_experts
            w = up.weight.repeat(m, 1)
            w += noise * up.weight.std() * torch.randn(w.shape, generator=gen)
            blk.mlp.up.weight.copy_(w)
            blk.mlp.up.bias.copy_(up.bias.repeat(m))
            blk.mlp.down.weight.copy_(down.weight.repeat(1, m))
            blk.mlp.down.bias.copy_(down.bias)
    if any(".mlp." not in k for k in missing):  # a bug here, not the user's: the two models' layouts differ
        raise RuntimeError(f"upcycling left non-MLP weights uninitialised: {missing}")
    return model


def parameter_counts(model: MoexLM) -> dict[str, int]:
    cfg = model.config
    per_block = activated_mlp_params(cfg)
    mlp_total = sum(p.numel() for blk in model.blocks for p in blk.mlp.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "mlp_total": mlp_total, "non_mlp": total - mlp_total,
            "activated_mlp": cfg.n_layer * per_block["experts"], "router": cfg.n_layer * per_block["router"],
            "activated": total - mlp_total + cfg.n_layer * (per_block["experts"] + per_block["router"])}

