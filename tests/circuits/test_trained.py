"""The whole path a user takes: a transcoder per layer trained by the pipeline on the tiny Llama (seconds each),
then `featurekit trace --transcoders` on their dictionary folders. Trained transcoders leave less to the error
nodes than random ones, so the graph's replacement score is higher."""

import pytest

from featurekit import cli, pipeline
from featurekit._io import read_json
from featurekit.circuits import transcoder_set
from featurekit.config import load_config

from .helpers import random_set


def train_layer(tiny, out, layer):
    cfg = pipeline.resolve(load_config(None, [
        f"out_dir={out}", f"name=tc{layer}", f"model.name={tiny / 'model'}", "model.dtype=float32",
        f"data.source={tiny / 'text.txt'}", f"site=mlp_in.{layer}", "data.context_len=16", "data.train_tokens=4000",
        "data.shard_tokens=1000", "data.cache=false", "dictionary.method=transcoder", "dictionary.n_latents=64",
        "dictionary.k=4", "train.batch_size=256", "train.buffer_tokens=1024", "train.lr=1e-2", "train.epochs=2"]))
    pipeline.run_train(cfg, progress=False)
    return out / f"tc{layer}" / "dictionary"


@pytest.mark.slow
def test_trace_with_pipeline_trained_transcoders(tiny, tmp_path):
    folders = [str(train_layer(tiny, tmp_path / "runs", layer)) for layer in range(3)]
    text = "the cat sat on the mat and the dog"
    assert cli.main(["trace", "--transcoders", *folders, "--prompt", text, "--out", str(tmp_path / "trained.json")]) == 0
    trained = read_json(tmp_path / "trained.json")["metadata"]
    assert trained["scan"] == str(tiny / "model") and trained["transcoder_list"] == folders  # the model named by the files
    set_dir = transcoder_set.save(random_set(model=str(tiny / "model")), tmp_path / "random")
    assert cli.main(["trace", "--set", str(set_dir), "--prompt", text, "--out", str(tmp_path / "random.json")]) == 0
    untrained = read_json(tmp_path / "random.json")["metadata"]
    assert trained["featurekit"]["replacement_logit_error"] <= 1e-4
    assert trained["featurekit"]["replacement_score"] > untrained["featurekit"]["replacement_score"] + 0.1
