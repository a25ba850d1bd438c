"""Sparse probing beyond BBC's topics, with the probes of evaluate/probing.py, each to its own SAEBench-format
JSON under OUT (RUN_DIR/evals or the folder of an evaluation with other settings):

- `run_probing_source` → sparse_probing_source.json: which corpus (BBC news / Bible / Shakespeare / Wikipedia
  when gensim is installed) a chunk of text comes from; mean-pooled codes of equal-length chunks
  (eval.probing_tokens tokens each, cut from SOURCE_CHUNK_CHARS_PER_TOKEN × that many characters), held out
  by document (data/probe_labels.py), eval.probing_train_docs / probing_test_docs chunks per corpus.
- `run_probing_tokens` → sparse_probing_tokens.json: token classes (digit, capitalised word, plural-looking,
  month) from the token strings, probed on per-token codes at the positions of those tokens in BBC articles
  (the training split's first eval.probing_train_docs articles, the held-out split's first probing_test_docs),
  positives capped at as many tokens per task and balanced by as many random other tokens; a task with fewer
  than MIN_POSITIVES positives on either side is skipped and listed as such."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .._io import atomic_write_json, read_json, sha256_file
from ..config import RunConfig
from ..config.checks import probing_ks
from ..data.probe_labels import TOKEN_TASKS, available_corpora, source_chunks, token_labels
from ..data.sources import load_texts
from ..dictionaries import load
from ..errors import FeaturekitError
from ..evaluate.plots import write_plot
from ..evaluate.probing import pooled_documents, probe_accuracies, token_codes, token_documents
from ..evaluate.saebench import eval_output
from ..models.loading import LoadedModel
from .evaluation import check_dictionary
from .setup import dtype_name, open_model, token_policy

SOURCE_CHUNK_CHARS_PER_TOKEN = 8
HELD_OUT_FRACTION = 0.2
MIN_POSITIVES = 4


def _open(cfg: RunConfig, loaded: LoadedModel | None):
    if cfg.output_site:
        raise FeaturekitError(f"sparse probing reads one site's codes; {cfg.run_dir} holds a transcoder ({cfg.site} → "
                              f"{cfg.output_site}), which it does not probe yet")
    loaded = loaded or open_model(cfg)
    sae = load(cfg.run_dir / "dictionary", device=next(loaded.model.parameters()).device)
    check_dictionary(cfg, loaded, sae)
    return loaded, sae


def _config(cfg: RunConfig, loaded: LoadedModel, task: str, ks: list[int], **extra) -> dict:
    return {"task": task, **extra, "context_length": cfg.eval.probing_tokens, "k_values": ks, "random_seed": cfg.train.seed,
            "probe": "logistic regression, L2 (C = 1) on standardised columns",
            "latent_selection": "largest |class mean difference| on the training examples",
            "model_name": cfg.model.name, "site": cfg.site, "dtype": dtype_name(loaded.model.dtype), "token_policy": token_policy(cfg)}


def _metrics(mean: dict) -> dict:
    return {group: {k: v for k, v in mean.items() if k.startswith(group + "_")} for group in ("llm", "sae", "pca")}


def _write(cfg: RunConfig, out_dir: Path | None, name: str, config: dict, mean: dict, details: list[dict], unstructured: dict) -> dict:
    unstructured["dictionary_sha256"] = sha256_file(cfg.run_dir / "dictionary" / "model.safetensors")
    result = eval_output("sparse_probing", config, _metrics(mean), details, unstructured,
                         read_json(cfg.run_dir / "dictionary" / "featurekit.json"))
    atomic_write_json(Path(out_dir or cfg.run_dir / "evals") / name, result)
    write_plot(result, (Path(out_dir or cfg.run_dir / "evals") / name).with_suffix(""))
    return result


def run_probing_source(cfg: RunConfig, loaded: LoadedModel | None = None, out_dir: Path | None = None) -> dict:
    """Text-source probing (module docstring); returns the result written to sparse_probing_source.json."""
    loaded, sae = _open(cfg, loaded)
    ks = probing_ks(cfg.eval.probing_ks)
    start = time.perf_counter()
    corpora = available_corpora()
    chunk_chars = SOURCE_CHUNK_CHARS_PER_TOKEN * cfg.eval.probing_tokens
    pooled, documents = {}, {}
    for split, per_class in (("train", cfg.eval.probing_train_docs), ("test", cfg.eval.probing_test_docs)):
        rows = source_chunks(corpora, chunk_chars, per_class, split, HELD_OUT_FRACTION)
        dense, codes, kept = pooled_documents(
            loaded.model, loaded.tokenizer, sae, cfg.site, [r[0] for r in rows], cfg.eval.probing_tokens,
            batch_size=cfg.eval.batch_contexts, exclude_first=cfg.data.exclude_first,
            exclude_special=cfg.data.exclude_special, max_norm_multiple=cfg.data.max_norm_multiple)
        pooled[split] = (dense, codes, [rows[i][1] for i in kept])
        documents[split] = {name: len({r[2] for r in rows if r[1] == name}) for name in corpora}
    (dense_tr, codes_tr, y_tr), (dense_te, codes_te, y_te) = pooled["train"], pooled["test"]
    acc = probe_accuracies((dense_tr, codes_tr), (dense_te, codes_te), y_tr, y_te, ks, seed=cfg.train.seed)
    config = _config(cfg, loaded, "text_source", ks, corpora=list(corpora), chunk_chars=chunk_chars,
                     probe_train_chunks_per_class=cfg.eval.probing_train_docs,
                     probe_test_chunks_per_class=cfg.eval.probing_test_docs,
                     split=f"by document: per corpus the {HELD_OUT_FRACTION:.0%} of documents lowest by content hash "
                           "(and the source's held-out split) are held out with all their chunks")
    unstructured = {"per_class": acc["per_class"], "n_train_chunks": len(y_tr), "n_test_chunks": len(y_te),
                    "documents": documents, "seconds": {"total": round(time.perf_counter() - start, 2)}}
    return _write(cfg, out_dir, "sparse_probing_source.json", config, acc["mean"],
                  [{"dataset_name": "text_source_results", **acc["mean"]}], unstructured)


def select_tokens(labels: list[bool], cap: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, targets): up to `cap` positives (random if more) and as many negatives, drawn with `seed`."""
    pos = torch.tensor([i for i, y in enumerate(labels) if y], dtype=torch.long)
    neg = torch.tensor([i for i, y in enumerate(labels) if not y], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    n = min(len(pos), len(neg), cap)
    pos, neg = pos[torch.randperm(len(pos), generator=g)[:n]], neg[torch.randperm(len(neg), generator=g)[:n]]
    return torch.cat([pos, neg]), torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])


def run_probing_tokens(cfg: RunConfig, loaded: LoadedModel | None = None, out_dir: Path | None = None) -> dict:
    """Token-class probing (module docstring); returns the result written to sparse_probing_tokens.json."""
    loaded, sae = _open(cfg, loaded)
    ks = probing_ks(cfg.eval.probing_ks)
    start = time.perf_counter()
    sides = {}
    for split, n_docs in (("train", cfg.eval.probing_train_docs), ("test", cfg.eval.probing_test_docs)):
        ids, mask, _ = token_documents(loaded.tokenizer, load_texts("bbc", split, max_docs=n_docs), cfg.eval.probing_tokens,
                                       exclude_first=cfg.data.exclude_first, exclude_special=cfg.data.exclude_special)
        positions = mask.nonzero()
        strings = {t: token_labels(loaded.tokenizer.decode([t])) for t in ids[mask].unique().tolist()}
        sides[split] = (ids, positions, [strings[t] for t in ids[mask].tolist()], n_docs)
    picked, skipped = {}, {}
    for j, task in enumerate(TOKEN_TASKS):
        picked[task] = {split: select_tokens([lab[task] for lab in labels], n_docs, cfg.train.seed + 2 * j + (split == "test"))
                        for split, (_, _, labels, n_docs) in sides.items()}
        counts = {split: int(y.sum()) for split, (_, y) in picked[task].items()}
        if min(counts.values()) < MIN_POSITIVES:
            skipped[task] = f"too few positive tokens (train {counts['train']}, held out {counts['test']}; need {MIN_POSITIVES})"
            del picked[task]
    rows = {}  # one pass through the model per split, at the union of every task's tokens
    for split, (ids, positions, _, _) in sides.items():
        union = sorted({i for task in picked for i in picked[task][split][0].tolist()})
        if union:
            dense, codes = token_codes(loaded.model, sae, cfg.site, ids, positions[union], batch_size=cfg.eval.batch_contexts)
            rows[split] = ({i: r for r, i in enumerate(union)}, dense, codes)
    details, per_task, means = [], {}, []
    for task, sides_picked in picked.items():
        data = {}
        for split, (idx, y) in sides_picked.items():
            where, dense, codes = rows[split]
            at = torch.tensor([where[i] for i in idx.tolist()], dtype=torch.long)
            data[split] = (dense[at], codes[at], ["yes" if t else "no" for t in y.tolist()])
        (d_tr, c_tr, y_tr), (d_te, c_te, y_te) = data["train"], data["test"]
        acc = probe_accuracies((d_tr, c_tr), (d_te, c_te), y_tr, y_te, ks, seed=cfg.train.seed, classes=["yes"])
        details.append({"dataset_name": f"token_{task}_results", **acc["mean"]})
        per_task[task] = {**acc["per_class"]["yes"], "n_positive_train": y_tr.count("yes"), "n_positive_test": y_te.count("yes")}
        means.append(acc["mean"])
    mean = {k: sum(m[k] for m in means) / len(means) for k in means[0]} if means else {}
    config = _config(cfg, loaded, "token_classes", ks, tasks=list(TOKEN_TASKS), text="bbc",
                     probe_train_docs=cfg.eval.probing_train_docs, probe_test_docs=cfg.eval.probing_test_docs,
                     split="by document: BBC's training split for the probes' training tokens, its held-out split for the test tokens")
    unstructured = {"per_task": per_task, "skipped": skipped, "seconds": {"total": round(time.perf_counter() - start, 2)}}
    return _write(cfg, out_dir, "sparse_probing_tokens.json", config, mean, details, unstructured)
