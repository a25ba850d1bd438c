"""Results in SAEBench's format: one JSON object per (dictionary, evaluation), so featurekit's results sit beside
SAEBench's published ones. Top-level fields as SAEBench's `BaseEvalOutput` names them; the SAELens and SAEBench
identifiers are null (the dictionary is not a SAELens release, the code is not SAEBench's) and `sae_cfg_dict`
describes the dictionary with SAELens's key names where one exists, featurekit's own file beside them."""

from __future__ import annotations

import time
import uuid


def sae_cfg_dict(metadata: dict) -> dict:
    """The dictionary's description in SAELens's `cfg` key names, from its featurekit.json `metadata`."""
    source = metadata.get("source", {})
    return {"architecture": metadata.get("method"), "d_in": metadata.get("d_in"), "d_sae": metadata.get("n_latents"),
            "dtype": metadata.get("dtype"), "model_name": source.get("model"), "hook_name": source.get("site"),
            "context_size": source.get("context_len"), "k": metadata.get("inference_rule", {}).get("k"),
            "featurekit": metadata}


def eval_output(eval_type_id: str, eval_config: dict, metrics: dict, details: list[dict], unstructured: dict | None,
                metadata: dict) -> dict:
    """The SAEBench-shaped result object (a fresh `eval_id` and the time now)."""
    return {"eval_type_id": eval_type_id, "eval_config": eval_config, "eval_id": str(uuid.uuid4()),
            "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
            "eval_result_details": details, "eval_result_unstructured": unstructured, "sae_bench_commit_hash": None,
            "sae_lens_id": None, "sae_lens_release_id": None, "sae_lens_version": None, "sae_cfg_dict": sae_cfg_dict(metadata)}
