"""`featurekit explain` end to end on the tiny run with in-process judges: a constant judge scores balanced
accuracy and AUC 0.5 on every unit; a judge whose answers never parse is counted, not dropped; the replay cache
makes a rerun cost no judge call and give bit-identical files; the explanations reach the feature store and the
Neuronpedia export; artefacts of other settings are refused; a SIGKILLed CLI run, rerun, gives the same files
as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featurekit.autointerp import explain_run
from featurekit.autointerp.hf import HFJudge
from featurekit.cli import main
from featurekit.errors import FeaturekitError
from featurekit.features.export import export_neuronpedia
from featurekit.features.store import FeatureStore

from .conftest import small

UNITS = [2, 3, 4, 5]


@pytest.fixture(scope="module")
def constant(judges):
    return HFJudge(str(judges["constant"]))


@pytest.fixture(scope="module")
def first(tiny_run, constant, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    summary = explain_run(tiny_run, ids=UNITS, judge=constant, out=out, settings=small(explainers=("highlight", "logits")),
                          progress=False)
    return out, summary


def results(out: Path) -> dict[str, bytes]:
    """Every result file of an autointerp folder (not the cache, not the per-invocation log)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.json"))
            if p.is_file() and "cache" not in p.relative_to(out).parts}


def test_constant_judge_scores_chance(first):
    out, summary = first
    assert summary["requested"] == 4 and summary["with_examples"] == 4
    for explainer in ("highlight", "logits"):
        entry = summary["explainers"][explainer]
        assert entry["explained"] == 4 and entry["bare_answers"] == 4  # "1 1 1 ..." is one short line
        for scorer in ("detection", "fuzzing"):
            s = entry["scores"][scorer]
            assert s["unparsed_answers"] == 0 and s["answers"] > 0
            assert s["balanced_accuracy"]["mean"] == 0.5 and s["balanced_accuracy"]["n"] == 4
            assert s["auc"]["mean"] == 0.5  # a uniform next-token distribution: P(1) / (P(0) + P(1)) = 1/2 everywhere
        assert entry["scores"]["surprisal"]["auc"]["n"] == 4 and entry["scores"]["embedding"]["auc"]["n"] == 4
    assert summary["intruder"]["unparsed_answers"] == 0 and summary["intruder"]["answers"] == 8
    assert summary["requests"]["sent"] > 0 and summary["requests"]["prompt_tokens"] > 0
    log = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert log[-1]["requests"]["sent"] == summary["requests"]["sent"]


def test_explanations_reach_the_store_and_the_export(tiny_run, first, tmp_path):
    store = FeatureStore(tiny_run)
    page = store.feature(UNITS[0])
    rows = {e["explainer"]: e for e in page["explanations"]}
    assert set(rows) == {"highlight@constant", "logits@constant"}
    assert rows["highlight@constant"]["score"] == 0.5 and rows["highlight@constant"]["details"]["main"] == "detection.balanced_accuracy"
    assert rows["highlight@constant"]["text"].startswith("1 1")
    assert store.summaries([UNITS[0]])[UNITS[0]]["explanation"].startswith("1 1")
    export_neuronpedia(store, tmp_path / "np", features=UNITS)
    notes = json.loads((tmp_path / "np" / "explanations.json").read_text())
    assert {(n["index"], n["typeName"], n["explanationModelName"]) for n in notes} == \
        {(str(u), f"featurekit-{e}", "constant") for u in UNITS for e in ("highlight", "logits")}
    assert all(n["layer"].startswith("1-featurekit-topk") and n["score"] == 0.5 for n in notes)


def test_replay_cache_makes_reruns_free_and_identical(tiny_run, first, constant, tmp_path):
    out, summary = first
    again = tmp_path / "b"
    s2 = explain_run(tiny_run, ids=UNITS, judge=constant, out=again, cache=out / "cache",
                     settings=small(explainers=("highlight", "logits")), progress=False, write_to_store=False)
    asked = summary["requests"]["sent"] + summary["requests"]["replayed"]  # (both explainers' "1 1 1" ask the same questions)
    assert s2["requests"]["sent"] == 0 and s2["requests"]["replayed"] == asked
    assert results(again) == results(out)
    s3 = explain_run(tiny_run, ids=UNITS, judge=constant, out=out, settings=small(explainers=("highlight", "logits")), progress=False)
    assert s3["requests"]["sent"] == 0 and s3["requests"]["replayed"] == 0  # every unit's files are there: nothing asked


def test_unparseable_answers_are_counted(tiny_run, judges, tmp_path):
    """A judge of random words: its free answers (lists of three labels) never parse; its multiple-choice answers
    (one-excerpt questions, the intruder test) always do, being picked among the choices."""
    three = small(scorers=("detection", "fuzzing", "intruder"))
    three.scoring.n_shown = 3
    summary = explain_run(tiny_run, ids=UNITS[:2], judge=HFJudge(str(judges["salad"])), out=tmp_path / "s", settings=three,
                          progress=False, write_to_store=False)
    entry = summary["explainers"]["highlight"]
    assert entry["explained"] + len(entry["unparseable"]) == 2
    if entry["explained"]:
        for d in entry["scores"].values():
            assert d["unparsed_answers"] == d["answers"] > 0 and d["balanced_accuracy"]["n"] == 0
            assert d["balanced_accuracy"]["missing"] == entry["explained"]
    assert summary["intruder"]["unparsed_answers"] == 0 and summary["intruder"]["accuracy"]["n"] == 2


def test_other_settings_are_refused(tiny_run, first, constant):
    out, _ = first
    other = small(explainers=("highlight", "logits"))
    other.examples.n_explain = 2
    with pytest.raises(FeaturekitError, match="examples.n_explain"):
        explain_run(tiny_run, ids=UNITS, judge=constant, out=out, settings=other, progress=False)


def cli(run_dir, out, judge, *extra):
    return ["explain", str(run_dir), "--out", str(out), "--judge", f"hf:{judge}",
            "--surprisal-model", str(judge), "--features", "0-7", "--threads", "1", "--quiet", "--no-store",
            "--scorers", "detection,fuzzing,intruder,surprisal", "--set", "examples.n_explain=3", "--set", "examples.n_test=4",
            "--set", "examples.n_random=2", "--set", "examples.n_neighbour=1", "--set", "examples.n_semantic=0",
            "--set", "examples.min_explain=2", "--set", "examples.min_test=2", "--set", "pool_contexts=32",
            "--set", "explain_tokens=12", "--set", "scoring.n_intruder=2", "--set", "scoring.intruder_shown=3", *extra]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_results(tiny_run, judges, tmp_path, capsys):
    """The uninterrupted run and the rerun go through the CLI in this process (one torch thread, like the killed
    one), the killed run in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    judge = judges["salad"]  # answers that depend on every prompt: any drift would show
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(cli(tiny_run, whole, judge)) == 0
    assert "judge requests:" in capsys.readouterr().out
    proc = subprocess.Popen([sys.executable, "-m", "featurekit", *cli(tiny_run, cut, judge)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((cut / "scores").rglob("0*.json"))) >= 3:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    assert not (cut / "summary.json").exists()
    assert main(cli(tiny_run, cut, judge)) == 0
    assert results(cut) == results(whole)
    assert not list(cut.rglob(".*.tmp"))


def test_tokens_explainer_asks_no_judge(tiny_run, constant, tmp_path):
    from featurekit.autointerp.explainers import tokens_explanation

    out = tmp_path / "tok"
    summary = explain_run(tiny_run, ids=UNITS, judge=constant, out=out, settings=small(explainers=("tokens",), scorers=("detection",)),
                          progress=False, write_to_store=False)
    entry = summary["explainers"]["tokens"]
    assert entry["explained"] == 4 and entry["scores"]["detection"]["balanced_accuracy"]["n"] == 4
    questions = sum(json.loads(p.read_text())["answers"] for p in (out / "scores").rglob("0*.json"))
    assert summary["requests"]["sent"] == questions  # the detection questions only: no explanation request
    for u in UNITS:
        record = json.loads((out / "examples" / f"{u:07d}.json").read_text())
        got = json.loads((out / "explanations" / f"tokens@{constant.label}" / f"{u:07d}.json").read_text())
        assert got["explanation"] == tokens_explanation(record) and got["how"] == "tokens"
