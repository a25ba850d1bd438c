"""Files written before the method registry (featurekit at 680426b, format v1: tests/fixtures/v1) still load,
run and evaluate: every method's dictionary file, and a run folder (its flat v1 config.json included)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import featurekit
from featurekit.cli import main
from featurekit.config import load_config, validate
from featurekit.dictionaries import METHODS

V1 = Path(__file__).parent / "fixtures" / "v1"
NEWER_THAN_V1 = {"clt"}  # methods added after format v1: no v1 file of theirs exists


@pytest.mark.parametrize("method", sorted(set(METHODS) - NEWER_THAN_V1))
def test_every_v1_dictionary_file_loads_and_encodes(method):
    folder = V1 / "dictionaries" / method
    d = featurekit.load(folder)
    assert d.method == method and d.d_in == 8 and d.n_latents == 16
    saved = load_file(folder / "model.safetensors")
    for key, value in d.state_dict().items():
        assert torch.equal(value, saved[key].to(value.dtype)), key
    x = torch.randn(5, 8)
    if not d.transcodes:
        assert d.reconstruct(x).shape == (5, 8) and torch.isfinite(d.encode(x)).all()


def test_v1_hyperparameter_names_map_onto_the_registry():
    assert featurekit.load(V1 / "dictionaries" / "gba").hyperparams()["groups"] == 10  # gba_groups in the file
    assert featurekit.load(V1 / "dictionaries" / "itda").threshold == pytest.approx(4e-4)  # itda_threshold
    assert featurekit.load(V1 / "dictionaries" / "snmf").nnls_iters == 30  # snmf_nnls_iters
    saved = json.loads((V1 / "dictionaries" / "gba" / "featurekit.json").read_text())["hyperparams"]
    assert "gba_groups" in saved  # the fixture is really v1


def test_a_v1_config_loads_with_only_its_methods_keys():
    cfg = load_config(V1 / "run" / "config.json")
    validate(cfg)
    assert cfg.dictionary.method == "topk" and cfg.dictionary.params.k == 4 and cfg.dictionary.n_latents == 32
    assert set(cfg.to_dict()["dictionary"]) == {"method", "n_latents", "k", "selection", "threshold_decay"}


def test_a_v1_run_folder_evaluates_and_reports(tiny, tmp_path, capsys):
    """The run folder was trained on the tiny Llama of tests/tiny.py (seeded: the same weights here); its
    config.json points at the machine that wrote it, so the copy is pointed at this test's tiny model."""
    run = tmp_path / "old_run"
    shutil.copytree(V1 / "run", run)
    config = json.loads((run / "config.json").read_text())
    config["model"]["name"], config["data"]["source"] = str(tiny / "model"), str(tiny / "text.txt")
    (run / "config.json").write_text(json.dumps(config))
    old = json.loads((run / "eval.json").read_text())
    assert main(["eval", str(run), "--quiet"]) == 0, capsys.readouterr().err
    new = json.loads((run / "eval.json").read_text())
    assert new["complete"] and new["n_tokens"] == old["n_tokens"]
    assert new["fvu"] == pytest.approx(old["fvu"], rel=1e-4) and new["ce_spliced"] == pytest.approx(old["ce_spliced"], rel=1e-4)
    assert main(["report", str(run)]) == 0 and "FVU" in (run / "report.html").read_text()
