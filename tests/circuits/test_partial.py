"""Partial transcoder sets, made explicit (`transcoder_set.partial`, `--partial-set`): a layer without a transcoder
keeps its whole MLP output as its error node, so the replacement stays exact and the graph's edges stay the
frozen model's effects; without the option such a set is refused; results say they come from a partial set."""

import pytest
import torch

from featurekit import cli
from featurekit._io import read_json
from featurekit.circuits import attribution, faithfulness, prune, replacement, transcoder_set
from featurekit.errors import FeaturekitError

from .helpers import prompt, random_transcoder, tiny_llama


def _gappy(model=None):
    return transcoder_set.TranscoderSet({0: random_transcoder(0), 2: random_transcoder(2, skip=True)}, model)


def test_partial_replacement_is_exact_and_has_no_features_in_the_gap():
    model = tiny_llama()
    with pytest.raises(FeaturekitError, match="partial-set"):
        replacement.build(model, _gappy(), prompt())
    pset = transcoder_set.partial(_gappy(), 3)
    assert pset.covered == [0, 2] and pset.missing == [1] and pset.listing()[1] == transcoder_set.NO_TRANSCODER
    rm = replacement.build(model, pset, prompt())
    assert torch.allclose(rm.replacement_logits(), rm.clean_logits, atol=1e-4 * float(rm.clean_logits.abs().max()))
    assert torch.equal(rm.errors[1], rm.mlp_out[1])                  # the whole MLP output is the error node
    assert not (rm.active_features().layer == 1).any()
    target = int(rm.clean_logits[-1].argmax())
    graph = attribution.attribute(rm, [target])
    idx = list(range(0, graph.n_features, 3))
    assert abs(faithfulness.predicted_change(graph, target, idx)["direct"] - faithfulness.measured_frozen(rm, graph, target, idx)) < 1e-5
    assert torch.allclose(faithfulness.spliced_logits(model, rm), rm.clean_logits, atol=1e-4 * float(rm.clean_logits.abs().max()))
    assert len(prune.prune(graph).node_mask) == graph.adjacency.shape[0]
    with pytest.raises(FeaturekitError, match="4 layers"):
        replacement.build(model, transcoder_set.partial(_gappy(), 4), prompt())


def test_cli_partial_set_trace_and_faithfulness(tiny, tmp_path, capsys):
    set_dir = transcoder_set.save(_gappy(str(tiny / "model")), tmp_path / "gappy")
    text = "the cat sat on the mat and the dog"
    assert cli.main(["trace", "--set", str(set_dir), "--prompt", text, "--out", str(tmp_path / "no.json")]) != 0
    assert "partial-set" in capsys.readouterr().err
    assert cli.main(["trace", "--set", str(set_dir), "--prompt", text, "--out", str(tmp_path / "g.json"), "--partial-set"]) == 0
    assert "PARTIAL SET: transcoders at layers 0,2 only; layers 1 have none" in capsys.readouterr().out
    meta = read_json(tmp_path / "g.json")["metadata"]
    assert meta["featurekit"]["partial_set"] == {"covered": [0, 2], "missing": [1]} and "PARTIAL SET" in meta["info"]["description"]
    assert meta["transcoder_list"][1] == "none" and meta["featurekit"]["replacement_logit_error"] <= 1e-4
    assert cli.main(["circuits", "faithfulness", "--set", str(set_dir), "--partial-set", "--prompt", text, "--k", "1", "3",
                     "--seed", "2", "--out", str(tmp_path / "f.json")]) == 0
    out = read_json(tmp_path / "f.json")
    assert out["partial_set"] == {"covered": [0, 2], "missing": [1]} and {r["ranking"] for r in out["rows"]} >= {"random"}
    assert all(abs(r["predicted_direct"] - r["measured_frozen"]) < 1e-4 for r in out["rows"])
    assert "meas_model" in capsys.readouterr().out


def test_method_typo_lists_only_set_methods(tmp_path, capsys):
    assert cli.main(["circuits", "train-set", str(tmp_path / "s"), "--method", "transcodr"]) != 0
    err = capsys.readouterr().err
    assert "transcoder, skiptranscoder" in err and "clt" in err and "topk" not in err
