"""Live model calls: "try a text" (which features fire on each token) and "steer" (a greedy continuation with
features added at the site, beside the unsteered one).

The model is loaded on the first request that needs it and kept; requests that arrive while it loads wait
for it (one lock per model). Runs on the same model (same name, dtype, device) share one loaded model. The
dictionary is the run's own (`Run.dictionary`). Inputs are bounded: `MAX_TEXT_CHARS` characters,
`MAX_TOKENS` tokens, `MAX_NEW_TOKENS` generated tokens, `MAX_STEER_FEATURES` features.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.harvest import norm_outliers
from ..data.tokens import tokenize
from ..evaluate.steering import steer
from ..features.store import FeatureStore
from ..models.hooks import capture_activations
from ..models.loading import LoadedModel, has_lm_head
from ..pipeline import load_run_config, open_model
from .queries import BadRequest
from .runs import Run

MAX_TEXT_CHARS = 4000
MAX_TOKENS = 512
MAX_NEW_TOKENS = 64
MAX_STEER_FEATURES = 4
MAX_STRENGTH = 100.0
PER_TOKEN = 10  # features listed per token
ON_TEXT = 30  # features listed for the whole text


class TooLarge(BadRequest):
    """An input above one of the limits (a 413 with the limit in its message)."""


@dataclass
class TextCodes:
    """The features on each token of a text, ranked by how strongly each fires relative to its own largest
    activation over the store (|value| / peak: a dense feature's routine value does not outrank a rare feature at
    its maximum). `tokens` (texts), `kept` (the run's token policy keeps it), `per_token[i]`: [(feature, value,
    relative)] strongest first; `on_text`: [(feature, value of largest |value|, relative, tokens fired, value on
    every token)] for the features strongest anywhere in the text."""

    tokens: list[str]
    kept: list[bool]
    per_token: list[list[tuple[int, float, float]]]
    on_text: list[tuple[int, float, float, int, list[float]]]
    site: str


@dataclass
class Steered:
    prompt: str
    plain: str
    steered: str
    reference_norm: float
    added: list[tuple[int, float, float]] = field(default_factory=list)  # (feature, strength, scale)
    site: str = ""
    new_tokens: int = 0


class Models:
    """Models loaded on first use and kept, one per (name, dtype, device); each with a lock that also
    serialises the computations on it (two requests on a 2-core machine are not faster in parallel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple, tuple[threading.Lock, list[LoadedModel | None]]] = {}

    def _entry(self, run: Run) -> tuple[Any, threading.Lock, list]:
        cfg = run.cached("run_config", lambda: load_run_config(run.path))
        key = (cfg.model.name, cfg.model.dtype, cfg.model.device)
        with self._lock:
            entry = self._entries.setdefault(key, (threading.Lock(), [None]))
        return cfg, *entry

    def use(self, run: Run) -> tuple[Any, threading.Lock]:
        """(loaded model, its lock held by the caller): `with lock:` around every use."""
        cfg, lock, slot = self._entry(run)
        with lock:
            if slot[0] is None:
                slot[0] = open_model(cfg)
        return slot[0], lock

    def loaded(self, run: Run) -> bool:
        _, _, slot = self._entry(run)
        return slot[0] is not None


def check_text(text: str, what: str = "text") -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise TooLarge(f"the {what} is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}: try a shorter passage")
    if not text.strip():
        raise BadRequest(f"type a {what} first")
    return text


def _encode(loaded: LoadedModel, run: Run, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (T,), kept (T,), activations at the run's site (T, d) float32) of one text, as a run sees it."""
    sae = run.dictionary()
    policy = sae.metadata.get("special_tokens") or {}
    ids, keep = tokenize(loaded.tokenizer, [text], policy)
    if ids.shape[1] > MAX_TOKENS:
        raise TooLarge(f"the text is {ids.shape[1]:,} tokens long; the limit is {MAX_TOKENS:,}: try a shorter passage")
    acts = capture_activations(loaded.model, ids, [run.site])[run.site].float()
    keep = keep & ~norm_outliers(acts, keep, policy.get("max_norm_multiple"))
    return ids[0], keep[0], acts[0]


def _token_texts(loaded: LoadedModel, ids: list[int]) -> list[str]:
    return loaded.tokenizer.batch_decode([[i] for i in ids])


def text_codes(models: Models, run: Run, text: str) -> TextCodes:
    """Run the model and the dictionary on `text` (module docstring)."""
    check_text(text)
    sae = run.dictionary()
    loaded, lock = models.use(run)
    with lock, torch.no_grad():
        ids, kept, acts = _encode(loaded, run, text)
        device = next(sae.parameters(), torch.empty(0)).device
        codes = sae.encode(acts.to(device)).float().cpu()  # (T, F)
    codes[~kept] = 0  # the run's token policy: BOS, special tokens and attention sinks have no codes
    peaks = run.cached("peaks", lambda: torch.tensor([float("inf") if p is None or p <= 0 else p for p in run.query(FeatureStore.peaks)]))
    relative = codes.abs() / peaks  # a feature dead in the store ranks last (its peak is inf)
    relative[(codes != 0) & (relative == 0)] = 1e-12
    k = min(PER_TOKEN, codes.shape[1])
    top_r, top_i = relative.topk(k, dim=1)
    per_token = [[(int(f), float(codes[t, f]), float(r)) for f, r in zip(top_i[t], top_r[t]) if r > 0] for t in range(len(ids))]
    best_r, at = relative.max(dim=0)
    fired = (codes != 0).sum(dim=0)
    n = min(ON_TEXT, int((best_r > 0).sum()))
    best = best_r.topk(n).indices.tolist() if n else []
    on_text = [(f, float(codes[at[f], f]), float(best_r[f]), int(fired[f]), [round(float(v), 5) for v in codes[:, f]]) for f in best]
    return TextCodes(_token_texts(loaded, ids.tolist()), kept.tolist(), per_token, on_text, run.site)


def parse_steering(pairs: list[tuple[str, str]], n_latents: int) -> list[tuple[int, float]]:
    """(feature, strength) from the form's (feature, strength) fields; empty rows are skipped."""
    out = []
    for f, s in pairs:
        if not f.strip():
            continue
        if not f.strip().isdigit() or int(f) >= n_latents:
            raise BadRequest(f"{f!r} is not a feature of this run: ids go from 0 to {n_latents - 1}")
        try:
            strength = float(s)
        except ValueError:
            raise BadRequest(f"strength {s!r} of feature {f} is not a number") from None
        if not abs(strength) <= MAX_STRENGTH:
            raise BadRequest(f"strength {s} of feature {f} is outside ±{MAX_STRENGTH:g}")
        out.append((int(f), strength))
    if not out:
        raise BadRequest("choose at least one feature to steer with")
    if len(out) > MAX_STEER_FEATURES:
        raise TooLarge(f"{len(out)} features given; steer with at most {MAX_STEER_FEATURES} at once")
    return out


def steer_text(models: Models, run: Run, prompt: str, features: list[tuple[int, float]], new_tokens: int) -> Steered:
    """Greedy continuations of `prompt`, plain and with every feature's unit decoder direction added at the
    decoder's site at every position, scaled by strength × the median activation norm there on the prompt."""
    check_text(prompt, "prompt")
    if not 1 <= new_tokens <= MAX_NEW_TOKENS:
        raise TooLarge(f"new tokens must be between 1 and {MAX_NEW_TOKENS}")
    sae = run.dictionary()
    loaded, lock = models.use(run)
    if not has_lm_head(loaded.model):
        raise BadRequest(f"{run.model} has no LM head: it cannot generate text, so there is nothing to steer")
    site = run.decoder_site
    with lock, torch.no_grad():
        policy = sae.metadata.get("special_tokens") or {}
        ids, keep = tokenize(loaded.tokenizer, [prompt], policy)
        if ids.shape[1] > MAX_TOKENS:
            raise TooLarge(f"the prompt is {ids.shape[1]:,} tokens long; the limit is {MAX_TOKENS:,}")
        norms = capture_activations(loaded.model, ids, [site])[site][0].float().norm(dim=-1)
        kept = norms[keep[0]] if keep.any() else norms
        reference = float(kept.median())
        plain = _generate(loaded, ids, new_tokens)
        with ExitStack() as stack:
            for f, s in features:
                stack.enter_context(steer(loaded.model, sae, f, s * reference, site=site))
            steered = _generate(loaded, ids, new_tokens)
    return Steered(prompt, plain, steered, reference, [(f, s, s * reference) for f, s in features], site, new_tokens)


def _generate(loaded: LoadedModel, ids: torch.Tensor, new_tokens: int) -> str:
    """A greedy continuation (the new tokens only, decoded)."""
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=new_tokens,
                         do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=False)

