"""First-letter feature absorption of a run's dictionary (evaluate/first_letter.py builds the words, prompts and
activations, evaluate/absorption.py scores them) → OUT/absorption_first_letter.json in SAEBench's format,
OUT = RUN_DIR/evals or the folder of an evaluation with other settings.

A transcoder (site → output_site) is scored on what it writes: the codes are its encoder's on the input site,
the ground-truth probes are trained on the output site's activations (the MLP output), and a latent's share of a
token's projection on the probe is f_j (W_dec[j]·p̂), its decoder row being in the output space — the same
decomposition as for an SAE, of the transcoder's prediction instead of a reconstruction."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .._io import atomic_write_json, read_json, sha256_file
from ..config import RunConfig
from ..dictionaries import load
from ..evaluate.absorption import AbsorptionSettings, first_letter_absorption
from ..evaluate.first_letter import LETTERS, TEMPLATE_SUFFIX, alpha_tokens, split_words, word_activations_at
from ..evaluate.plots import write_plot
from ..evaluate.saebench import eval_output
from ..models.loading import LoadedModel
from .evaluation import check_dictionary
from .setup import dtype_name, open_model

EVAL_TYPE = "absorption_first_letter"  #: SAEBench's eval_type_id
TRAIN_FRACTION = 0.8  #: SAEBench's train_test_fraction
MIN_LETTERS = 20  #: SAEBench's min_feats_for_eval: fewer scored letters and SAEBench reports nothing
#: `featurekit eval --full`: SAEBench's settings (every single-token word, 10 examples, k up to 10)
FULL_SETTINGS = {"absorption_words": 0, "absorption_icl": 10, "absorption_max_k": 10, "absorption_l1_steps": 300}


def run_absorption(cfg: RunConfig, loaded: LoadedModel | None = None, out_dir: Path | None = None) -> dict:
    """Absorption of cfg.run_dir's dictionary with cfg.eval.absorption_*; returns the result (module docstring)."""
    out = Path(out_dir or cfg.run_dir / "evals")
    loaded = loaded or open_model(cfg)
    device = next(loaded.model.parameters()).device
    sae = load(cfg.run_dir / "dictionary", device=device)
    check_dictionary(cfg, loaded, sae)
    ev = cfg.eval
    start = time.perf_counter()
    vocabulary = alpha_tokens(loaded.tokenizer)
    train_words, test_words = split_words(vocabulary, ev.absorption_words or None, TRAIN_FRACTION, cfg.train.seed)
    probe_site = cfg.output_site or cfg.site  # a transcoder: probes on what it writes (module docstring)
    sites = list(dict.fromkeys([cfg.site, probe_site]))
    acts = {}
    for name, words in (("train", train_words), ("test", test_words)):
        seen, y = word_activations_at(loaded.model, loaded.tokenizer, sites, words, ev.absorption_icl,
                                      ev.absorption_words_per_sequence, cfg.train.seed, batch_size=ev.batch_contexts)
        x_in, x = seen[cfg.site], seen[probe_site]
        with torch.no_grad():
            codes = torch.cat([sae.encode(x_in[i:i + 1024].to(device)).float().cpu() for i in range(0, len(x_in), 1024)])
        acts[name] = (x, codes, y)
    activation_seconds = time.perf_counter() - start
    settings = AbsorptionSettings(max_k=ev.absorption_max_k, l1_steps=ev.absorption_l1_steps)
    (x_tr, c_tr, y_tr), (x_te, c_te, y_te) = acts["train"], acts["test"]
    result = first_letter_absorption(x_tr, c_tr, y_tr, x_te, c_te, y_te, sae.W_dec.detach().float().cpu(), LETTERS, settings)
    scored = result["n_scored_letters"]
    config = {"model_name": cfg.model.name, "site": cfg.site, **({"output_site": cfg.output_site, "probe_site": probe_site}
                                                                  if cfg.output_site else {}), "dtype": dtype_name(loaded.model.dtype),
              "random_seed": cfg.train.seed, "f1_jump_threshold": settings.f1_jump, "max_k_value": settings.max_k,
              "prompt_template": "{word}" + TEMPLATE_SUFFIX, "prompt_token_pos": "the word's own token (packed prompts)",
              "icl_examples": ev.absorption_icl, "words_per_sequence": ev.absorption_words_per_sequence,
              "n_words": len(train_words) + len(test_words), "n_vocabulary_words": len(vocabulary),
              "train_test_fraction": TRAIN_FRACTION, "k_sparse_probe_l1_decay": settings.l1,
              "k_sparse_probe_steps": settings.l1_steps, "min_GT_probe_f1": settings.min_probe_f1,
              "min_feats_for_eval": MIN_LETTERS, "ground_truth_probe": "logistic regression per letter, L2 (C = 1) on standardised "
              "activations, classes balanced", "absorber_cos": settings.absorber_cos, "full_absorber_cos": settings.full_absorber_cos,
              "probe_projection_share": settings.share, "max_absorbing_latents": settings.max_absorbers}
    details = [{"first_letter": letter, "mean_absorption_fraction": row["mean_absorption_fraction"],
                "full_absorption_rate": row["full_absorption_rate"], "num_full_absorption": row["num_full_absorption"],
                "num_probe_true_positives": row["num_probe_true_positives"], "num_split_features": row["num_split_features"]}
               for letter, row in result["letters"].items() if "skipped" not in row]
    warnings = []
    if scored < MIN_LETTERS:
        warnings.append(f"only {scored} letters have a ground-truth probe with F1 > {settings.min_probe_f1} (SAEBench needs "
                        f"{MIN_LETTERS} and reports nothing below that); "
                        + (f"the scores average over those {scored}" if scored else "no scores") +
                        " — more words (eval.absorption_words, 0 = all) give the probes more to learn from")
    unstructured = {"letters": result["letters"], "n_scored_letters": scored, "warnings": warnings,
                    "probe_f1": {letter: row.get("probe_f1") for letter, row in result["letters"].items()},
                    "dictionary_sha256": sha256_file(cfg.run_dir / "dictionary" / "model.safetensors"),
                    "seconds": {"activations": round(activation_seconds, 2), "total": round(time.perf_counter() - start, 2)}}
    output = eval_output(EVAL_TYPE, config, {"mean": result["mean"]}, details, unstructured,
                         read_json(cfg.run_dir / "dictionary" / "featurekit.json"))
    atomic_write_json(out / f"{EVAL_TYPE}.json", output)
    write_plot(output, out / EVAL_TYPE)
    return output
