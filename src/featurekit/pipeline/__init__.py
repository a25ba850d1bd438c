"""The whole job, step by step: harvest → train → evaluate → report, all inside one run directory.

    RUN_DIR/config.json          the resolved config (reproduces the run)
    RUN_DIR/activations/         the activation cache (sharded safetensors + manifest.json)
    RUN_DIR/checkpoint/          the trainer's resumable state
    RUN_DIR/metrics.jsonl        training curves
    RUN_DIR/dictionary/          model.safetensors + featurekit.json
    RUN_DIR/eval.json            held-out metrics
    RUN_DIR/features/            density.json, top_examples.json (the report's sample)
    RUN_DIR/features.sqlite      the feature store: every latent (`featurekit serve` reads it)
    RUN_DIR/evals/LABEL/         evaluations on other text (eval.json, features/)
    RUN_DIR/evals/sparse_probing.json  sparse probing (SAEBench's format; `featurekit eval --suite probing`)
    RUN_DIR/evals/sparse_probing_{source,tokens}.json  text-source and token-class probing (--suite probing_source,probing_tokens)
    RUN_DIR/report.html          the report

RUN_DIR is `out_dir/name` for a new run; a run folder is self-contained and relocatable, so commands given
a RUN_DIR (`load_run_config`) work in that folder wherever it lies. Modules, in the order a run meets them:
`setup` (config, checks before any weights load, the run folder, model and contexts), `training` (harvest,
cache identity, trainer, the saved dictionary), `evaluation`, `job` (the main job); `vision` (the same job
for a vision transformer on images, dispatched on the model by `job`, `setup` and `training`).
"""

from .._io import read_json
from ..train import distributed
from .evaluation import eval_complete, other_text, run_eval
from .features import run_features, store_complete
from .job import run_all
from .setup import (
    check_text,
    config_digest,
    contexts,
    dtype_name,
    harvest_sites,
    held_out_contexts,
    load_run_config,
    open_model,
    preflight,
    resolve,
    save_config,
    start,
    token_policy,
)
from .training import (
    INIT_SAMPLE_TOKENS,
    dictionary_complete,
    harvest_meta,
    run_digest,
    run_fit,
    run_harvest,
    run_train,
    save_dictionary,
    training_cache,
)

__all__ = [
    "INIT_SAMPLE_TOKENS", "check_text", "config_digest", "contexts", "dictionary_complete", "distributed", "dtype_name",
    "eval_complete", "harvest_meta", "harvest_sites", "held_out_contexts", "load_run_config", "open_model", "other_text",
    "preflight", "read_json", "resolve", "run_all", "run_digest", "run_eval", "run_features", "run_fit", "run_harvest", "run_train",
    "save_config", "save_dictionary", "start", "store_complete", "token_policy", "training_cache",
]
