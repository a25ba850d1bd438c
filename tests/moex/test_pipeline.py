"""A trained moex LM run folder in featurekit's pipeline by name: `featurekit run` (harvest → dictionary → feature
store) on its MLP hidden units, with its character tokenizer; the explorer's pages over the run; autointerp on the
LM's own units and on the SAE's features."""

import json
import subprocess
import sys

import pytest

import featurekit
from featurekit import pipeline
from featurekit.app import queries, views
from featurekit.app.runs import Run
from featurekit.cli import main
from featurekit.config import load_config
from featurekit.models.loading import load_model, load_model_config
from featurekit.models.sites import check_site
from featurekit.moex.chess import GameSpec, generate_games

LM = ["--d-model", "16", "--n-layer", "2", "--n-head", "2", "--seq-len", "64", "--batch-size", "8",
      "--checkpoint-every", "10", "--quiet"]
RUN = ["model.dtype=float32", "data.context_len=48", "data.train_tokens=3000", "data.shard_tokens=1500",
       "dictionary.n_latents=32", "dictionary.k=4", "train.batch_size=256", "train.buffer_tokens=1024", "train.epochs=2",
       "train.log_every=5", "eval.tokens=600", "eval.splice_contexts=4", "eval.batch_contexts=4", "report.n_features=3",
       "features.tokens=2000", "features.top_n=5", "train.threads=1"]


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """Two tiny LMs trained on chess games (text, one game a paragraph): MoE-X and dense ReLU."""
    root = tmp_path_factory.mktemp("moex_lm")
    games = list(generate_games(0, 120, GameSpec(greedy=0.5, max_chars=64)))
    (root / "games.txt").write_text("\n\n".join(games), encoding="ascii")
    runs = {}
    for kind in ("moex", "dense_relu"):
        runs[kind] = root / kind
        assert main(["moex", "train", str(runs[kind]), "--data", str(root / "games.txt"), "--kind", kind,
                     "--steps", "20", "--n-experts", "4", *LM]) == 0
    return root, runs


def featurekit_run(*sets):
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "featurekit.cli", "run", *args, "--quiet"], capture_output=True, text=True,
                          timeout=600)


def test_a_moex_run_folder_is_a_model_by_name(lm_runs):
    root, runs = lm_runs
    config = load_model_config(str(runs["moex"]))
    assert config.model_type == "featurekit_moex" and str(check_site(config, "mlp_hidden.1")) == "mlp_hidden.1"
    loaded = load_model(str(runs["moex"]))
    assert loaded.family == "moex" and loaded.n_layers == 2 and loaded.model.dtype.is_floating_point
    assert loaded.tokenizer.decode(loaded.tokenizer("1.e4 e5")["input_ids"]) == "1.e4 e5"


@pytest.fixture(scope="module")
def fk_runs(lm_runs):
    """kind → a `featurekit run` folder (TopK SAE on mlp_hidden.1, feature store) over that LM, by its folder's name."""
    root, runs = lm_runs
    sets = [f"out_dir={root / 'fk'}", f"data.source={root / 'games.txt'}", "site=mlp_hidden.1", *RUN]
    done = featurekit_run("name=moex", f"model.name={runs['moex']}", *sets)  # the real CLI, as a user types it
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = pipeline.resolve(load_config(None, ["name=dense_relu", f"model.name={runs['dense_relu']}", *sets]))
    pipeline.run_all(cfg, progress=False)  # the same job through the API
    return {kind: root / "fk" / kind for kind in runs}


@pytest.mark.parametrize("kind", ["moex", "dense_relu"])
def test_featurekit_run_on_a_moex_lm_builds_a_feature_store_the_explorer_renders(fk_runs, kind):
    run = fk_runs[kind]
    for name in ("eval.json", "dictionary/model.safetensors", "features/top_examples.json", "report.html"):
        assert (run / name).is_file(), name
    result = json.loads((run / "eval.json").read_text())
    assert "ce_spliced" in result and 0 < result["l0"] <= 4  # the LM's logits are scored with the splice
    width = 4 * 64 if kind == "moex" else 64  # M·D gated expert units, or the dense MLP's H neurons
    sae = featurekit.load(run / "dictionary")
    assert sae.d_in == width and sae.metadata["source"]["site"] == "mlp_hidden.1"
    explorer = Run(0, kind, run)
    try:
        listing = queries.feature_list(explorer)
        html = views.render("features.html", runs=[explorer], run=explorer, path="/", q="", section="features",
                            data=listing, sorts=queries.SORT_LABELS)
        assert f'href="/r/{kind}/f/' in html
        fid = listing["rows"][0]["id"]
        page = queries.feature_page(explorer, fid)
        html = views.render("feature.html", runs=[explorer], run=explorer, path="/", q="", section="features", f=page,
                            others=[], fid=fid, hist=views.act_histogram(page["hist"], explorer.meta["hist_edges"],
                                                                       page["density"]))
        assert any(piece in html for piece in ("e4", "Nf3", "O-O", "x")), "the contexts are chess characters"
    finally:
        explorer.close()


def test_autointerp_scores_the_moex_units_and_the_sae_features(fk_runs, tmp_path):
    """autointerp on the MoE-X model's own units (mlp_hidden.1: the gated expert units) and on the SAE's features,
    with a constant in-process judge (tests/autointerp): every unit gets a score, at chance."""
    from featurekit.autointerp import explain_run
    from featurekit.autointerp.hf import HFJudge

    from ..autointerp.conftest import small
    from ..autointerp.judge_models import write_judge

    judge = HFJudge(str(write_judge(tmp_path, "constant")))
    for units in ("mlp_hidden.1", "features"):
        summary = explain_run(fk_runs["moex"], units=units, n_units=2, judge=judge, out=tmp_path / units, settings=small(),
                              write_to_store=False, progress=False)
        assert summary["requested"] == 2 and summary["with_examples"] >= 1, (units, summary)  # a feature may fire too rarely
        detection = summary["explainers"]["highlight"]["scores"]["detection"]
        assert detection["balanced_accuracy"]["n"] == summary["with_examples"] and detection["balanced_accuracy"]["mean"] == 0.5


def test_the_explorer_reads_a_text_and_steers_the_moex_lm(fk_runs):
    """The explorer's live calls load the LM by the run's model name: features on each character of a typed
    text, and greedy continuations plain and steered (MoexLM.generate)."""
    from featurekit.app.live import Models, steer_text, text_codes

    explorer = Run(0, "moex", fk_runs["moex"])
    models = Models()
    try:
        codes = text_codes(models, explorer, ";1.e4 e5 2.Nf3")
        assert "".join(codes.tokens) == ";1.e4 e5 2.Nf3" and len(codes.per_token) == len(codes.tokens)
        steered = steer_text(models, explorer, ";1.e4 e5 2.", [(0, 50.0)], new_tokens=6)
        assert len(steered.plain) >= 6 and len(steered.steered) >= 6 and steered.site == "mlp_hidden.1"  # <pad> reads "<pad>"
        assert steered.plain != steered.steered  # a strength-50 feature direction changes the greedy characters
    finally:
        explorer.close()
