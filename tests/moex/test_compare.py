"""`featurekit moex compare`: the whole chess comparison end to end on tiny models, its resume and its refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from featurekit.cli import main
from featurekit.dictionaries import fileformat
from featurekit.errors import FeaturekitError
from featurekit.models.loading import load_model
from featurekit.models.moexlm.folder import load_lm
from featurekit.moex.chess import VOCAB, read_games, token_stream
from featurekit.moex.compare import ENTRIES, MODELS, CompareSettings, compare
from featurekit.moex.train import train_lm

TINY = dict(d_model=16, n_layer=2, n_head=2, seq_len=64, max_chars=64, n_experts=4, batch_size=4, steps=3, games=40,
            eval_games=6, legal_prefixes=4, sae_tokens=512, layer=-1)
FLAGS = ["--steps", "3", "--d-model", "16", "--n-layer", "2", "--n-head", "2", "--seq-len", "64", "--max-chars", "64",
         "--n-experts", "4", "--batch-size", "4", "--games", "40", "--eval-games", "6", "--legal-prefixes", "4",
         "--sae-tokens", "512", "--quiet"]


def test_compare_runs_end_to_end_and_a_rerun_skips_everything(tmp_path, capsys):
    out = tmp_path / "cmp"
    doc = compare(out, CompareSettings(**TINY), progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(doc))
    assert [r["name"] for r in results["models"]] == list(ENTRIES)
    assert results["steps"] == 3 and results["tokens_per_model"] == 3 * 4 * 64 and results["site"] == "mlp_hidden.1"
    rows = {r["name"]: r for r in results["models"]}
    for name, row in rows.items():
        for key in ("val_loss", "legal_move_rate", "coverage", "reconstruction", "reconstruction_no_start", "l0"):
            assert isinstance(row[key], float) and row[key] >= 0, (name, key)
        for key in ("legal_move_rate", "coverage", "reconstruction", "reconstruction_no_start"):
            assert row[key] <= 1, (name, key)
        assert row["legal_total"] == 4 and row["positions"] > 0
    # equal activated parameters and the same tokens for every LM; units: H for dense, M·D for the MoE kinds
    assert len({rows[n]["activated_params"] for n in MODELS if n != "switch"}) == 1
    assert rows["switch"]["activated_params"] - rows["dense_gelu"]["activated_params"] == 2 * 16 * 4  # its routers
    assert {rows[n]["train_tokens"] for n in MODELS} == {3 * 4 * 64}
    assert rows["dense_gelu"]["units"] == 64 and rows["moex"]["units"] == rows["sae"]["units"] == 4 * 64
    # the SAE: k from MoE-X's measured L0, latents = MoE-X's units; at most k latents active per position
    assert rows["sae"]["sae_k"] == max(1, round(rows["moex"]["l0"])) and rows["sae"]["l0"] <= rows["sae"]["sae_k"]
    assert fileformat.load(out / "runs" / "sae" / "sae").k == rows["sae"]["sae_k"]
    assert rows["moex_upcycled"]["paper"]["reconstruction"] == 0.840 and rows["sae"]["paper"] is None
    assert "| moex_upcycled |" in (out / "results.md").read_text()
    assert len(read_games(out / "data" / "eval")) == 6
    assert load_model(str(out / "runs" / "moex")).n_layers == 2  # the run folders are featurekit models
    # the same command again (through the CLI, same settings): nothing is retrained or re-evaluated
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*") if p.is_file()}
    assert main(["moex", "compare", str(out), *FLAGS]) == 0
    assert "| sae (TopK k=" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "results.json").read_text())["models"] == results["models"]
    # other settings into the same folder are refused, naming what differs
    with pytest.raises(FeaturekitError, match="other settings.*steps"):
        compare(out, CompareSettings(**{**TINY, "steps": 4}), progress=False)
    # cut short: only the dense runs left, one eval.json missing: a rerun trains and evaluates just the rest
    kept = load_lm(out / "runs" / "dense_gelu").state_dict()
    for name in ("switch", "moex", "moex_upcycled", "sae"):
        for p in sorted((out / "runs" / name).rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    (out / "runs" / "dense_relu" / "eval.json").unlink()
    doc = compare(out, CompareSettings(**TINY), progress=False)
    assert [r["name"] for r in doc["models"]] == list(ENTRIES)
    again = load_lm(out / "runs" / "dense_gelu").state_dict()
    assert all(torch.equal(kept[k], again[k]) for k in kept)
    assert (out / "runs" / "dense_gelu" / "eval.json").stat().st_mtime_ns == stamps[out / "runs" / "dense_gelu" / "eval.json"]
    redone = json.loads((out / "runs" / "dense_relu" / "eval.json").read_text())  # the evaluation is deterministic
    assert {k: v for k, v in redone.items() if k != "eval_s"} == {k: rows["dense_relu"][k] for k in redone if k != "eval_s"}


def test_compare_settings_refuse_bad_budgets():
    with pytest.raises(FeaturekitError, match="exactly one of steps"):
        CompareSettings(steps=0, minutes_per_model=0)
    with pytest.raises(FeaturekitError, match="exactly one of steps"):
        CompareSettings(steps=10, minutes_per_model=1)
    with pytest.raises(FeaturekitError, match="must fit the context"):
        CompareSettings(steps=10, seq_len=64, max_chars=128)
    with pytest.raises(FeaturekitError, match="layer=5"):
        CompareSettings(steps=10, n_layer=2, layer=5)


def test_a_killed_compare_resumes_the_model_it_was_training_and_skips_the_finished(tmp_path):
    """`featurekit moex compare` is SIGKILLed while it trains the third model (switch): the rerun keeps the two
    finished dense runs as they are and continues switch from its checkpoint, ending with the weights of a switch
    run never killed (bit for bit, one thread)."""
    out = tmp_path / "cmp"
    flags = [*FLAGS, "--checkpoint-every", "5", "--threads", "1"]
    flags[flags.index("--steps") + 1] = "60"
    proc = subprocess.Popen([sys.executable, "-m", "featurekit", "moex", "compare", str(out), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = out / "runs" / "switch" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads(state.read_text())["step"] >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    at_kill = json.loads(state.read_text())["step"]
    assert 5 <= at_kill < 60 and not (out / "runs" / "switch" / "model.safetensors").exists()
    dense = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("dense_*/model.safetensors")}
    assert len(dense) == 2
    settings = CompareSettings(**{**TINY, "steps": 60, "checkpoint_every": 5})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        doc = compare(out, settings, progress=False)
        stream = token_stream(read_games(out / "data" / "train"))
        reference = train_lm(tmp_path / "ref", stream, settings.lm("switch"), settings.train(60), vocab=list(VOCAB),
                             progress=False)
    finally:
        torch.set_num_threads(threads)
    assert {p: p.stat().st_mtime_ns for p in dense} == dense  # finished models were not retrained
    assert json.loads((out / "plan.json").read_text())["steps"] == 60 and doc["steps"] == 60
    a, b = load_lm(tmp_path / "ref").state_dict(), load_lm(out / "runs" / "switch").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert reference["val_loss"] == json.loads((out / "runs" / "switch" / "summary.json").read_text())["val_loss"]
    steps = [json.loads(line)["step"] for line in (out / "runs" / "switch" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 60
