"""The measurement with its controls on the tiny run: features, MLP neurons, random directions and shuffled
explanations side by side through the CLI; a constant judge scores 0.5 in every arm."""

import json

from featurekit.cli import main


def test_controls_side_by_side(tiny_run, judges, capsys):
    argv = ["explain", str(tiny_run), "--controls", "--n-features", "3", "--judge", f"hf:{judges['constant']}", "--quiet",
            "--scorers", "detection,intruder", "--set", "examples.n_explain=3", "--set", "examples.n_test=4",
            "--set", "examples.n_random=2", "--set", "examples.n_neighbour=1", "--set", "examples.n_semantic=0",
            "--set", "examples.min_explain=2", "--set", "examples.min_test=2", "--set", "pool_contexts=32",
            "--set", "explain_tokens=12", "--set", "scoring.n_intruder=2", "--set", "scoring.intruder_shown=3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = json.loads((tiny_run / "autointerp" / "comparison.json").read_text())
    arms = [r["arm"] for r in table["rows"]]
    assert arms == ["features", "features, shuffled explanations", "mlp_hidden.1", "mlp_hidden.1, shuffled explanations",
                    "random", "random, shuffled explanations"]
    for row in table["rows"]:
        assert row["units"] == 3 and row["detection"]["mean"] == 0.5
    neurons = next(r for r in table["rows"] if r["arm"] == "mlp_hidden.1, shuffled explanations")
    assert f"| mlp_hidden.1, shuffled explanations | highlight | 3 | {neurons['explained']} | 0.500" in printed
    assert f"(n={neurons['detection']['n']})" in printed
    assert (tiny_run / "autointerp" / "comparison.md").read_text() == printed
    made = {p.name for p in (tiny_run / "autointerp").iterdir()}
    assert {"cache", "comparison.json", "comparison.md", "features", "mlp_hidden.1", "random"} <= made
