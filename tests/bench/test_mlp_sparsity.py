"""`featurekit mlp-sparsity` on the tiny random model: the driver packs held-out contexts, masks them and runs
the evaluation (tested in tests/evaluate/test_mlp_topk.py); the CLI prints the table and writes the JSON."""

import json

from featurekit.bench.mlp_sparsity import run_mlp_sparsity
from featurekit.data.sources import load_texts
from featurekit.data.tokens import pack, token_mask
from featurekit.evaluate.mlp_topk import mlp_sparsity_eval
from featurekit.models import load_model


def test_driver_runs_the_evaluation_on_packed_held_out_contexts(tiny):
    model, text = str(tiny / "model"), str(tiny / "text.txt")
    result = run_mlp_sparsity(model, None, (2, 64), ("abs_topk",), text, contexts=4, context_len=16, progress=False)
    assert result["sites"] == ["mlp_hidden.1"] and result["contexts"] == 4 and result["split"] == "test"
    loaded = load_model(model)
    ids = pack(load_texts(text, "test"), loaded.tokenizer, 16, max_contexts=4)
    same = mlp_sparsity_eval(loaded.model, ids, token_mask(ids, loaded.tokenizer), [1], (2, 64), ("abs_topk",), progress=False,
                             max_norm_multiple=50.0)
    assert {k: result[k] for k in same} == same
    full = {r["k"]: r for r in result["rows"]}[64]  # all 64 neurons kept: exactly clean
    assert full["kl"] == 0.0 and full["ce"] == result["ce_clean"]


def test_cli_mlp_sparsity(tiny, tmp_path, capsys):
    from featurekit.cli import main

    out = tmp_path / "mlp.json"
    rc = main(["mlp-sparsity", "--model", str(tiny / "model"), "--layers", "0", "2", "--k", "4", "--rules", "abs_topk", "topk",
               "--source", str(tiny / "text.txt"), "--contexts", "2", "--context-len", "16", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and "['mlp_hidden.0', 'mlp_hidden.2']" in printed and "abs_topk" in printed
    result = json.loads(out.read_text())
    assert [(r["rule"], r["k"]) for r in result["rows"]] == [("abs_topk", 4), ("topk", 4)]
