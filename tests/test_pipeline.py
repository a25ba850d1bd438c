"""The pipeline on a tiny random Llama saved to a local directory, with a local text file:
local model and text loading, streaming and cached training, evaluation and the report."""

import json

import pytest
import torch

import featurekit
from featurekit import pipeline
from featurekit.config import load_config
from featurekit.dictionaries.registry import param_names
from featurekit.errors import FeaturekitError

from .tiny import WORDS


def config(tiny, tmp_path, *extra):
    """The tiny run's config; k = 4 for the methods that take a k (another method refuses the key)."""
    method = next((e.split("=", 1)[1] for e in extra if e.startswith("dictionary.method=")), "topk")
    k = ["dictionary.k=4"] if "k" in param_names(method) else []
    return pipeline.resolve(load_config(None, [
        f"out_dir={tmp_path}", f"model.name={tiny / 'model'}", "model.dtype=float32", f"data.source={tiny / 'text.txt'}",
        "site=resid_post.1", "data.context_len=16", "data.train_tokens=4000", "data.shard_tokens=1000",
        "dictionary.n_latents=64", *k, "train.batch_size=256", "train.buffer_tokens=1024",
        "train.epochs=2", "train.log_every=5", "eval.tokens=600", "eval.splice_contexts=8", "eval.batch_contexts=8",
        "report.n_features=3", *extra,
    ]))


@pytest.mark.parametrize("cache,method", [(True, "topk"), (False, "topk"), (True, "relu"), (True, "batchtopk"), (True, "jumprelu"),
                                          (True, "abstopk"), (True, "gsae"), (False, "gsae")])
def test_tiny_model_end_to_end(tiny, tmp_path, cache, method):
    cfg = config(tiny, tmp_path, f"data.cache={str(cache).lower()}", "name=r", f"dictionary.method={method}",
                 *(["dictionary.l1_coefficient=0.05"] if method == "relu" else []), f"data.gradients={str(method == 'gsae').lower()}")
    report = pipeline.run_all(cfg, progress=False)
    run = cfg.run_dir
    assert report == run / "report.html" and report.is_file()
    assert (run / "activations" / "manifest.json").is_file() == cache
    result = json.loads((run / "eval.json").read_text())
    # a random model predicts near-uniformly, so only the bookkeeping is checked here (the embedded
    # model's end-to-end test checks clean < spliced < zero-ablated)
    lr = (result["ce_zero_ablated"] - result["ce_spliced"]) / (result["ce_zero_ablated"] - result["ce_clean"])
    assert result["loss_recovered"] == pytest.approx(lr) and result["kl_clean_spliced"] >= 0
    assert 0 < result["fvu"] < 1 and 0 < result["l0"] and result["n_tokens"] <= 600
    if method == "topk":
        assert result["l0"] <= 4
    sae = featurekit.load(run / "dictionary")
    assert sae.metadata["source"]["site"] == "resid_post.1" and sae.d_in == 32 and sae.method == method
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # it learned
    examples = json.loads((run / "features" / "top_examples.json").read_text())
    assert len(examples) == 3 and all(ex["examples"] for ex in examples)
    assert all(tok.strip() in WORDS + ["", "<eos>"] for ex in examples for e in ex["examples"] for tok in e["tokens"])


def fixed_reconstruction(fn):
    """A 32-wide dictionary whose reconstruction is `fn(x)` (exact, zero, ...), for splice tests."""

    class Fixed(featurekit.Dictionary):
        method = "fixed"

        def reconstruct(self, x):
            return fn(x)

    return Fixed(32, 8)


def test_splicing_an_exact_reconstruction_recovers_all_loss(tiny, tmp_path):
    """With a dictionary that reconstructs exactly, spliced CE = clean CE and KL = 0."""
    cfg = config(tiny, tmp_path, "name=exact")
    loaded = pipeline.open_model(cfg)
    ids, mask = pipeline.contexts(loaded, cfg, "test", 300)

    from featurekit.evaluate.splice import splice_eval

    result = splice_eval(loaded.model, fixed_reconstruction(lambda x: x), "resid_post.1", ids, mask, 8, progress=False)
    assert result["ce_spliced"] == pytest.approx(result["ce_clean"], abs=1e-6)
    assert result["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-6) and result["loss_recovered"] == pytest.approx(1.0)


def test_empty_corpus_is_a_clear_error_and_writes_no_cache(tiny, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    cfg = config(tiny, tmp_path, f"data.source={tmp_path / 'empty.txt'}", "name=e")
    with pytest.raises(FeaturekitError, match="empty|no text|no document"):
        pipeline.run_harvest(cfg, progress=False)
    assert not (cfg.run_dir / "activations").exists()


def test_splicing_zeros_equals_zero_ablation_and_touches_only_kept_positions(tiny, tmp_path):
    from featurekit.evaluate.metrics import token_cross_entropy
    from featurekit.evaluate.splice import splice_eval
    from featurekit.models.hooks import replace

    cfg = config(tiny, tmp_path, "name=zero")
    loaded = pipeline.open_model(cfg)
    ids, mask = pipeline.contexts(loaded, cfg, "test", 300)

    result = splice_eval(loaded.model, fixed_reconstruction(torch.zeros_like), "resid_post.1", ids, mask, 8, progress=False)
    assert result["ce_spliced"] == pytest.approx(result["ce_zero_ablated"], abs=1e-6)
    assert result["loss_recovered"] == pytest.approx(0.0, abs=1e-6)

    # keeping one position: predictions before it are untouched (causal model), from it on they change
    keep = torch.zeros_like(mask[:2])
    keep[:, 5] = True
    with torch.no_grad():
        clean = token_cross_entropy(loaded.model(input_ids=ids[:2]).logits, ids[:2])
        with replace(loaded.model, "resid_post.1", lambda a: a.masked_fill(keep[..., None], 0.0)):
            edited = token_cross_entropy(loaded.model(input_ids=ids[:2]).logits, ids[:2])
    assert torch.equal(clean[:, :5], edited[:, :5]) and not torch.equal(clean[:, 5:], edited[:, 5:])


def test_an_encoder_runs_end_to_end_with_the_splice_skipped(tiny_bert, tmp_path):
    """BERT has no language-model head: harvest, training, reconstruction metrics, features and the report all
    work, and eval.json says why there is no CE/KL (it used to crash at the splice, losing the metrics)."""
    cfg = pipeline.resolve(load_config(None, [
        f"out_dir={tmp_path}", "name=bert", f"model.name={tiny_bert / 'model'}", "model.dtype=float32",
        f"data.source={tiny_bert / 'text.txt'}", "site=resid_post.1", "data.context_len=16", "data.train_tokens=3000",
        "dictionary.n_latents=64", "dictionary.k=4", "train.batch_size=256", "train.buffer_tokens=1024", "train.epochs=2",
        "eval.tokens=600", "eval.batch_contexts=8", "report.n_features=3",
    ]))
    report = pipeline.run_all(cfg, progress=False)
    result = json.loads((cfg.run_dir / "eval.json").read_text())
    assert 0 < result["fvu"] < 1 and result["l0"] <= 4 and result["complete"]
    assert "ce_clean" not in result and "no language-model head" in result["splice"]["skipped"]
    assert "no language-model head" in report.read_text()
    assert json.loads((cfg.run_dir / "features" / "top_examples.json").read_text())
