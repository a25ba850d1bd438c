"""Sparse probing of a run's dictionary on BBC News's topics (evaluate/probing.py) → OUT/sparse_probing.json in
SAEBench's format (evaluate/saebench.py), OUT = RUN_DIR/evals or the folder of an evaluation with other settings.

The probes train on the BBC articles of the training split and are scored on the held-out split (the rule of
data/sources.py): with a dictionary trained on BBC's training split, no held-out article was seen in training."""

from __future__ import annotations

import time
from pathlib import Path

from .._io import atomic_write_json, read_json, sha256_file
from ..config import RunConfig
from ..config.checks import probing_ks
from ..data.sources import labelled_documents
from ..dictionaries import load
from ..errors import FeaturekitError
from ..evaluate.plots import write_plot
from ..evaluate.probing import pooled_documents, probe_accuracies
from ..evaluate.saebench import eval_output
from ..models.loading import LoadedModel
from .evaluation import check_dictionary
from .setup import dtype_name, open_model, token_policy

TASK = "bbc_topic"


def run_probing(cfg: RunConfig, loaded: LoadedModel | None = None, out_dir: Path | None = None) -> dict:
    """Sparse probing of cfg.run_dir's dictionary with cfg.eval.probing_* (module docstring); returns the result."""
    if cfg.output_site:
        raise FeaturekitError(f"sparse probing reads one site's codes; {cfg.run_dir} holds a transcoder ({cfg.site} → "
                              f"{cfg.output_site}), which it does not probe yet")
    out = Path(out_dir or cfg.run_dir / "evals")
    loaded = loaded or open_model(cfg)
    sae = load(cfg.run_dir / "dictionary", device=next(loaded.model.parameters()).device)
    check_dictionary(cfg, loaded, sae)
    ks = probing_ks(cfg.eval.probing_ks)
    start = time.perf_counter()
    pooled = {}
    for split, per_class in (("train", cfg.eval.probing_train_docs), ("test", cfg.eval.probing_test_docs)):
        docs, labels = first_per_class(labelled_documents(TASK, split), per_class)
        dense, codes, kept = pooled_documents(
            loaded.model, loaded.tokenizer, sae, cfg.site, docs, cfg.eval.probing_tokens, batch_size=cfg.eval.batch_contexts,
            exclude_first=cfg.data.exclude_first, exclude_special=cfg.data.exclude_special,
            max_norm_multiple=cfg.data.max_norm_multiple)
        pooled[split] = (dense, codes, [labels[i] for i in kept])
    pooling_seconds = time.perf_counter() - start
    (dense_tr, codes_tr, y_tr), (dense_te, codes_te, y_te) = pooled["train"], pooled["test"]
    acc = probe_accuracies((dense_tr, codes_tr), (dense_te, codes_te), y_tr, y_te, ks, seed=cfg.train.seed)
    mean = acc["mean"]
    config = {"task": TASK, "probe_train_docs_per_class": cfg.eval.probing_train_docs,
              "probe_test_docs_per_class": cfg.eval.probing_test_docs, "context_length": cfg.eval.probing_tokens,
              "k_values": ks, "random_seed": cfg.train.seed, "probe": "logistic regression, L2 (C = 1) on standardised columns",
              "latent_selection": "largest |class mean difference| on the training documents",
              "model_name": cfg.model.name, "site": cfg.site, "dtype": dtype_name(loaded.model.dtype), "token_policy": token_policy(cfg)}
    metrics = {"llm": {k: v for k, v in mean.items() if k.startswith("llm_")},
               "sae": {k: v for k, v in mean.items() if k.startswith("sae_")},
               "pca": {k: v for k, v in mean.items() if k.startswith("pca_")}}
    details = [{"dataset_name": f"{TASK}_results", **mean}]
    unstructured = {"per_class": acc["per_class"], "n_train_documents": len(y_tr), "n_test_documents": len(y_te),
                    "dictionary_sha256": sha256_file(cfg.run_dir / "dictionary" / "model.safetensors"),
                    "seconds": {"pooling": round(pooling_seconds, 2), "total": round(time.perf_counter() - start, 2)}}
    result = eval_output("sparse_probing", config, metrics, details, unstructured,
                         read_json(cfg.run_dir / "dictionary" / "featurekit.json"))
    atomic_write_json(out / "sparse_probing.json", result)
    write_plot(result, out / "sparse_probing")
    return result


def first_per_class(pairs: list[tuple[str, str]], n: int) -> tuple[list[str], list[str]]:
    """The first n documents of each label, in the source's order."""
    seen: dict[str, int] = {}
    docs, labels = [], []
    for doc, label in pairs:
        if seen.get(label, 0) < n:
            seen[label] = seen.get(label, 0) + 1
            docs.append(doc)
            labels.append(label)
    return docs, labels
