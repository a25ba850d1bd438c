"""The local replacement model of one prompt (Ameisen et al. 2025, "Circuit Tracing", §2.2).

Every MLP is replaced by its transcoder, every norm and attention pattern is frozen at the clean forward
(`frozen`), and an error node per (layer, position) carries what the transcoder misses:

    x_0        = the clean residual entering block 0 (token embeddings; GPT-2: + position embeddings)
    x_mid,L    = x_L + attn_L(norm1_L(x_L))
    m_L        = norm2_L(x_mid,L)                                   the transcoder's input (mlp_in.L)
    x_L+1      = x_mid,L + T_L(m_0..m_L) + ε_L                      T_L: the set's prediction of mlp_out.L
    ε_L        = mlp_out.L − T_L(clean inputs)   (clean values, held fixed)

T_L is a per-layer transcoder's f_L W_dec + b_dec (+ W_skip m_L), or for a cross-layer transcoder the sum
Σ_{l ≤ L} f_l W_dec,l→L + b_dec,L of every earlier layer's latents' writes into layer L (`transcoder_set`).
    logits     = norm_f(x_n) W_Uᵀ + b_U

With ε_L added, the replacement reproduces the clean logits (up to float rounding). With the features'
activations also held fixed, T_L is affine in the residual stream (its only input-dependent part is the
skip path W_skip m_L), so the whole model is: x_0 and every layer's MLP write (features f_i·W_dec[i]
into every layer they write to, errors, decoder biases)
flow linearly, through frozen attention, frozen norms and skip paths, to every m_L and to norm_f(x_n).
`frozen_forward` runs that linear model on a batch of injected writes; attribution differentiates it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import FeaturekitError
from ..models.hooks import capture
from ..models.sites import blocks, unwrap
from .frozen import FrozenLayer, FrozenNorm, block_parts, check_family, final_norm, freeze_attention, freeze_norm, unembedding
from .sets import AnySet, TranscoderSet


@dataclass
class ActiveFeatures:
    """The transcoder latents that fire on the prompt, ordered by (layer, position, latent)."""

    layer: Tensor       # (n,) long
    pos: Tensor         # (n,) long
    latent: Tensor      # (n,) long
    activation: Tensor  # (n,) float: the code f (raw units)

    def __len__(self) -> int:
        return int(self.layer.numel())


@dataclass
class LocalReplacement:
    """One prompt's replacement model; tensors are float32, positions T, width d, vocabulary V."""

    input_ids: Tensor             # (T,)
    embeddings: Tensor            # (T, d) = x_0
    layers: list[FrozenLayer]
    final: FrozenNorm
    W_U: Tensor                   # (V, d)
    b_U: Tensor | None
    transcoders: AnySet           # folded copies: codes in raw units (per-layer or cross-layer)
    mlp_in: list[Tensor]          # (T, d) clean transcoder inputs
    mlp_out: list[Tensor]         # (T, d) clean MLP outputs
    errors: list[Tensor]          # (T, d) ε_L
    codes: list[Tensor]           # (T, F_L) transcoder codes on the clean input
    clean_logits: Tensor          # (T, V) the model's own logits

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    def skip(self, layer: int, m: Tensor) -> Tensor | float:
        """The transcoder's linear skip path W_skip m (0 for a plain transcoder)."""
        return self.transcoders.skip(layer, m)

    def zeros(self, *shape: int) -> Tensor:
        """A zero tensor on the replacement model's device, in its dtype."""
        return torch.zeros(shape, dtype=self.embeddings.dtype, device=self.embeddings.device)

    def skip_vjp(self, layer: int, g: Tensor) -> Tensor | None:
        """The transposed skip path: W_skipᵀ g (None for a plain transcoder)."""
        w = self.transcoders.skip_weight(layer)
        return None if w is None else g @ w

    def run(self, x0: Tensor, write: Callable[[int, Tensor], Tensor]) -> tuple[list[Tensor], Tensor]:
        """The frozen model on x0 (B, T, d); `write(L, m_L)` is what layer L's MLP adds. Returns
        ([m_L (B, T, d) for every layer], norm_f(x_n) (B, T, d))."""
        x, ins = x0, []
        for layer, frozen in enumerate(self.layers):
            x = x + frozen.attn(frozen.ln1(x))
            m = frozen.ln2(x)
            ins.append(m)
            x = x + write(layer, m)
        return ins, self.final(x)

    def frozen_forward(self, x0: Tensor, writes: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """The linear(ised) model: features held fixed, layer L's MLP adds writes[L] (B, T, d) plus its skip path."""
        return self.run(x0, lambda layer, m: writes[layer] + self.skip(layer, m))

    def backward(self, seeds: Sequence[tuple[int, int, Tensor]]) -> tuple[Tensor, list[Tensor | None]]:
        """Gradients of B targets at once through the linear model, by its transposed maps (no autograd).

        `seeds[b]` = (layer, pos, vector): target b is vector · m_layer[pos], or vector · norm_f(x_n)[pos] for
        layer == n_layers. Returns (∂/∂x_0 (B, T, d), [∂/∂write_L (B, T, d), None above the highest seed]).
        Walking down from the highest seeded layer, each layer adds its seeds at m_L after the gradient
        of write_L is read, so a target never receives from its own layer's MLP write."""
        B, T, d = len(seeds), self.n_pos, self.embeddings.shape[-1]
        placed: dict[int, Tensor] = {}
        for b, (layer, pos, vector) in enumerate(seeds):
            if layer not in placed:
                placed[layer] = self.zeros(B, T, vector.shape[-1])
            placed[layer][b, pos] = vector
        g = self.final.vjp(placed[self.n_layers]) if self.n_layers in placed else self.zeros(B, T, d)
        top = self.n_layers - 1 if self.n_layers in placed else max(placed)
        writes: list[Tensor | None] = [None] * self.n_layers
        for layer in range(top, -1, -1):
            frozen = self.layers[layer]
            writes[layer] = g                                   # x_L+1 = x_mid + write_L + skip(m_L)
            g_m = self.skip_vjp(layer, g)
            if layer in placed:
                g_m = placed[layer] if g_m is None else g_m + placed[layer]
            g_mid = g if g_m is None else g + frozen.ln2.vjp(g_m)
            g = g_mid + frozen.ln1.vjp(frozen.attn.vjp(g_mid))   # x_mid = x_L + attn(norm1(x_L))
        return g, writes

    def unembed(self, final: Tensor) -> Tensor:
        logits = final @ self.W_U.T
        return logits if self.b_U is None else logits + self.b_U

    @torch.no_grad()
    def replacement_logits(self, errors: bool = True, clamps: Mapping[tuple[int, int, int], float] | None = None) -> Tensor:
        """(T, V) logits of the replacement model with live transcoders (codes recomputed from each m_L) plus ε
        (without ε when not `errors`: the transcoders alone). `clamps` {(layer, pos, latent): value} holds those
        codes at the value (raw units, as the graph's activations) while every other code stays live: an
        intervention on the local replacement model (attention patterns and norm scales stay frozen)."""
        codes: dict[int, Tensor] = {}
        clamps = dict(clamps or {})
        for layer, pos, latent in clamps:
            if not (0 <= layer < self.n_layers and 0 <= pos < self.n_pos and 0 <= latent < self.codes[layer].shape[-1]):
                raise FeaturekitError(f"no feature ({layer}, {pos}, {latent}) in this replacement model: it has "
                                      f"{self.n_layers} layers, {self.n_pos} positions and {self.codes[0].shape[-1]} latents a layer")

        def write(layer: int, m: Tensor) -> Tensor:
            codes[layer] = self.transcoders.encode(layer, m)
            for (at, pos, latent), value in clamps.items():
                if at == layer:
                    codes[layer][..., pos, latent] = value
            prediction = self.transcoders.prediction(layer, codes, m)
            return prediction + self.errors[layer] if errors else prediction

        _, final = self.run(self.embeddings[None], write)
        return self.unembed(final)[0]

    def active_features(self) -> ActiveFeatures:
        parts = []
        for layer, codes in enumerate(self.codes):
            pos, latent = torch.nonzero(codes, as_tuple=True)
            parts.append((torch.full_like(pos, layer), pos, latent, codes[pos, latent]))
        layer, pos, latent, act = (torch.cat(t) for t in zip(*parts))
        return ActiveFeatures(layer, pos, latent, act.float())

    def targets(self, layer: int) -> list[int]:
        """The layers whose MLP output layer `layer`'s latents write to ([layer] for per-layer transcoders)."""
        return self.transcoders.targets(layer)

    def decoder_rows(self, layer: int, latents: Tensor, target: int | None = None) -> Tensor:
        """W_dec rows (n, d) of layer `layer`'s latents into layer `target`'s MLP output (default: their own
        layer): the direction a unit code writes there."""
        return self.transcoders.decoder_rows(layer, layer if target is None else target, latents)

    def encoder_rows(self, layer: int, latents: Tensor) -> Tensor:
        """W_enc rows (n, d): the gradient of each latent's pre-activation with respect to m_L."""
        return self.transcoders.encoder_rows(layer, latents)

    def pre_activations(self, layer: int, m: Tensor) -> Tensor:
        return self.transcoders.pre_activation(layer, m)

    def writes(self, feature_scale: Tensor | None = None, error_scale: Tensor | None = None,
               bias: bool = True) -> list[Tensor]:
        """Each layer's MLP write built from the parts the graph has nodes for: Σ f_i W_dec[i] (each code times
        `feature_scale`, (B, n) or None for 1) + ε_L,t (times `error_scale`, (B, n_layers, T)) + b_dec (if `bias`).
        B = 1 when neither scale is given. For perturbation checks and the bias terms of each node."""
        feats = self.active_features()
        B = max(1 if s is None else s.shape[0] for s in (feature_scale, error_scale))
        out = [self.zeros(B, self.n_pos, self.mlp_out[layer].shape[-1]) for layer in range(self.n_layers)]
        for source in range(self.n_layers):
            sel = feats.layer == source
            acts = feats.activation[sel].expand(B, -1) if feature_scale is None else feats.activation[sel] * feature_scale[:, sel]
            for target in self.targets(source):
                contrib = acts[..., None] * self.decoder_rows(source, feats.latent[sel], target)  # (B, n_L, d)
                out[target] = out[target].index_add(1, feats.pos[sel], contrib)
        for layer, w in enumerate(out):
            err = self.errors[layer].expand(B, -1, -1)
            w = w + (err if error_scale is None else err * error_scale[:, layer, :, None])
            out[layer] = w + self.transcoders.output_bias(layer) if bias else w
        return out


def _clean_forward(model: Any, input_ids: Tensor, n: int) -> tuple[dict[str, Tensor], tuple[Tensor, ...], Tensor]:
    """One clean forward with eager attention (the only kind that returns patterns), capturing the sites
    the replacement model needs; the model's attention implementation is restored afterwards."""
    hf = unwrap(model)
    sites = [f"{kind}.{layer}" for layer in range(n) for kind in ("resid_pre", "attn_out", "mlp_in", "mlp_out")]
    previous = hf.config._attn_implementation
    if previous != "eager":
        hf.set_attn_implementation("eager")
    try:
        with torch.no_grad(), capture(model, *sites, f"resid_post.{n - 1}") as acts:
            out = hf(input_ids=input_ids[None], output_attentions=True, use_cache=False)
    finally:
        if previous != "eager":
            hf.set_attn_implementation(previous)
    if out.attentions is None or len(out.attentions) != n or any(a is None for a in out.attentions):
        raise FeaturekitError(f"{type(hf).__name__} did not return its attention patterns with eager attention; "
                              "the local replacement model needs them to freeze attention")
    return acts, out.attentions, out.logits[0]


def build(model: Any, transcoders: AnySet, input_ids: Tensor | Sequence[int]) -> LocalReplacement:
    """The local replacement model of `model` on one prompt (`input_ids` (T,) or (1, T))."""
    family = check_family(model)
    layer_list = blocks(model)
    n = len(layer_list)
    transcoders.check_covers(n)
    tset = transcoders.folded()
    ids = torch.as_tensor(input_ids).long()
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise FeaturekitError(f"build needs one prompt's token ids, shape (T,) or (1, T); got {tuple(ids.shape)}")
    device = next(unwrap(model).parameters()).device
    tset = tset.to(device)
    acts, patterns, logits = _clean_forward(model, ids.to(device), n)

    def act(site: str) -> Tensor:
        return acts[site][0].float()

    layers, mlp_in, mlp_out, errors, codes = [], [], [], [], []
    for layer, block in enumerate(layer_list):
        ln1, attn, ln2 = block_parts(family, block)
        x, mid = act(f"resid_pre.{layer}"), act(f"resid_pre.{layer}") + act(f"attn_out.{layer}")
        layers.append(FrozenLayer(freeze_norm(ln1, x), freeze_attention(family, attn, patterns[layer][0]), freeze_norm(ln2, mid)))
        m, y = act(f"mlp_in.{layer}"), act(f"mlp_out.{layer}")
        with torch.no_grad():
            codes.append(tset.encode(layer, m).float())
            prediction = tset.prediction(layer, dict(enumerate(codes)), m).float()
            if isinstance(tset, TranscoderSet) and layer in tset.transcoders:
                _check_affine(tset[layer], layer, m, codes[layer], prediction)
        mlp_in.append(m)
        mlp_out.append(y)
        errors.append(y - prediction)
    W_U, b_U = unembedding(model)
    final = freeze_norm(final_norm(model), act(f"resid_post.{n - 1}"))
    return LocalReplacement(ids.cpu(), act("resid_pre.0"), layers, final, W_U, b_U, tset, mlp_in, mlp_out, errors, codes,
                            logits.float())


def _check_affine(tc: Any, layer: int, m: Tensor, f: Tensor, prediction: Tensor) -> None:
    """The attribution reads a transcoder as f W_dec + b_dec + skip(m): refuse one that computes something else."""
    skip = tc.skip(m) if hasattr(tc, "skip") else 0.0
    affine = f @ tc.W_dec + tc.b_dec + skip
    scale = prediction.abs().max().clamp_min(1e-6)
    if not torch.allclose(affine, prediction, atol=1e-4 * float(scale), rtol=1e-4):
        raise FeaturekitError(f"the {tc.method} transcoder of layer {layer} does not predict codes·W_dec + b_dec (+ a "
                              "linear skip); the attribution graph cannot split its output into features")
