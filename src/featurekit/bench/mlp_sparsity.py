"""`featurekit mlp-sparsity`: how much of a model's own MLP can be dropped at inference, on held-out text.

Loads the model, packs contexts of a text source (`data.tokens.pack`, the held-out split by default), masks
them as training data is masked (`data.tokens.token_mask`: not position 0, not special tokens) and runs the
evaluation `featurekit.evaluate.mlp_topk.mlp_sparsity_eval` (rules, masking and scores are documented there).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.sources import load_texts
from ..data.tokens import pack, token_mask
from ..evaluate.mlp_topk import DEFAULT_RULES, mlp_sparsity_eval


def run_mlp_sparsity(
    model: str = "smollm2-135m",
    layers: Sequence[int] | None = None,
    ks: Sequence[int] = (16, 64, 256, 1024),
    rules: Sequence[str] = DEFAULT_RULES,
    source: str = "bbc",
    contexts: int = 8,
    context_len: int = 128,
    split: str = "test",
    batch_contexts: int = 8,
    max_norm_multiple: float | None = 50.0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Load `model`, pack `contexts` contexts of `source` (held-out split), mask them and run `mlp_sparsity_eval`
    (layers None → the middle block). The result also records the model, source, split, contexts and context_len."""
    from ..models.loading import load_model  # imported here to keep the module light

    loaded = load_model(model, device=device)
    layers = [loaded.n_layers // 2] if layers is None else list(layers)
    ids = pack(load_texts(source, split), loaded.tokenizer, context_len, max_contexts=contexts)
    mask = token_mask(ids, loaded.tokenizer)
    result = mlp_sparsity_eval(loaded.model, ids, mask, layers, ks, rules, batch_contexts, max_norm_multiple, progress)
    return {"model": model, "source": source, "split": split, "contexts": len(ids), "context_len": context_len, **result}
