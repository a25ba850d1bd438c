"""The feature store on a tiny model: every statistic equals a brute-force computation over the dense codes,
signed codes keep both tails, per-process statistics merge into one process's, a killed build leaves the old
store and a rerun gives the same store, torchrun's shards give the same store, foreign files are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit import pipeline
from featurekit.config import load_config
from featurekit.dictionaries import load
from featurekit.errors import FeaturekitError
from featurekit.features.stats import FeatureStatistics, bin_of
from featurekit.features.store import FILENAME, FeatureStore
from featurekit.models.hooks import capture_activations
from featurekit.pipeline.features import store_contexts

from ..test_pipeline import config


def tiny_run(tiny, out, *extra):
    cfg = config(tiny, out, "name=s", "features.tokens=3000", "features.top_n=5", "features.cofire_tokens=100000", *extra)
    pipeline.run_all(cfg, progress=False)
    return cfg


@pytest.fixture(scope="module")
def topk_run(tiny, tmp_path_factory):
    return tiny_run(tiny, tmp_path_factory.mktemp("store_topk"))


@pytest.fixture(scope="module")
def abstopk_run(tiny, tmp_path_factory):
    return tiny_run(tiny, tmp_path_factory.mktemp("store_abstopk"), "dictionary.method=abstopk")


def dense_codes(cfg):
    """The pass the store made, by brute force: every kept token's dense codes, with its context and position."""
    loaded = pipeline.open_model(cfg)
    sae = load(cfg.run_dir / "dictionary")
    ids, mask, _ = store_contexts(loaded, cfg)
    acts = capture_activations(loaded.model, ids, [cfg.site])[cfg.site].float()
    from featurekit.data.harvest import norm_outliers

    keep = mask.clone()
    for start in range(0, len(ids), cfg.features.batch_contexts):  # the harvest's per-batch outlier rule
        sl = slice(start, start + cfg.features.batch_contexts)
        keep[sl] &= ~norm_outliers(acts[sl], mask[sl], cfg.data.max_norm_multiple)
    with torch.no_grad():
        codes = sae.encode(acts)
    return ids, keep, codes


@pytest.mark.parametrize("run", ["topk_run", "abstopk_run"])
def test_store_statistics_equal_a_brute_force_pass(run, request):
    cfg = request.getfixturevalue(run)
    ids, keep, codes = dense_codes(cfg)
    store = FeatureStore(cfg.run_dir)
    kept = codes[keep]  # (n, F)
    assert store.meta["n_tokens"] == kept.shape[0] and store.n_latents == kept.shape[1]
    signed = store.meta["signed"]
    ctx, pos = keep.nonzero(as_tuple=True)
    for f in range(store.n_latents):
        page = store.feature(f)
        col = kept[:, f]
        nz = col != 0
        assert page["fires"] == int(nz.sum())
        assert page["density"] == pytest.approx(float(nz.float().mean()))
        if not nz.any():
            continue
        assert page["max"] == pytest.approx(float(col[nz].max()), rel=1e-6)
        assert page["min"] == pytest.approx(float(col[nz].min()), rel=1e-6)
        assert page["mean"] == pytest.approx(float(col[nz].double().mean()), rel=1e-5)
        positive = torch.bincount(bin_of(col[nz & (col > 0)]), minlength=64).tolist()
        assert page["hist"].get("positive", [0] * 64) == positive
        if signed:
            assert page["hist"].get("negative", [0] * 64) == torch.bincount(bin_of(col[nz & (col < 0)]), minlength=64).tolist()
        # top examples: the largest codes, ties by (context, position)
        order = sorted(range(int(nz.sum())), key=lambda i: (-float(col[nz][i]), int(ctx[nz][i]), int(pos[nz][i])))
        want = [(int(ctx[nz][i]), int(pos[nz][i])) for i in order[:5] if float(col[nz][i]) > (float("-inf") if signed else 0)]
        got = [(e["context"], e["position"]) for e in page["examples"]["top"]]
        assert got == want[: len(got)] and len(got) == min(5, int(nz.sum()))
        if signed and (col < 0).any():
            neg = sorted(range(int(nz.sum())), key=lambda i: (float(col[nz][i]), int(ctx[nz][i]), int(pos[nz][i])))
            assert [(e["context"], e["position"]) for e in page["examples"]["bottom"]] == \
                [(int(ctx[nz][i]), int(pos[nz][i])) for i in neg[:5]]
        # every example shows the feature's exact code on every token of its context (0 where masked out)
        for kind, examples in page["examples"].items():
            for e in examples:
                c = e["context"]
                want_acts = (codes[c, :, f] * keep[c]).tolist()
                assert e["acts"] == pytest.approx(want_acts, abs=1e-6), (f, kind)
                assert e["value"] == pytest.approx(float(codes[c, e["position"], f]), rel=1e-6)
        # top tokens: exact counts
        tokens = ids[keep]
        counts = torch.bincount(tokens[nz], minlength=int(ids.max()) + 1)
        for token, count, _ in page["top_tokens"]:
            assert count == int(counts[token])
        assert page["top_tokens"][0][1] == int(counts.max())


def test_signed_codes_keep_both_tails(abstopk_run):
    store = FeatureStore(abstopk_run.run_dir)
    pages = [store.feature(f) for f in range(store.n_latents)]
    assert any(p["min"] is not None and p["min"] < 0 for p in pages)
    assert any("negband0" in p["examples"] for p in pages) and any("bottom" in p["examples"] for p in pages)
    assert any("negative" in p["hist"] for p in pages)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.booleans())
def test_per_process_statistics_merge_into_one_process(seed, parts, signed):
    gen = torch.Generator().manual_seed(seed)
    F, T, V, n_ctx = 9, 6, 15, 12
    codes = torch.randn(n_ctx, T, F, generator=gen) * 2
    codes[torch.rand(n_ctx, T, F, generator=gen) > 0.3] = 0
    if not signed:
        codes = codes.abs()
    tokens = torch.randint(0, V, (n_ctx, T), generator=gen)

    def stats(contexts):
        s = FeatureStatistics(F, T, V, signed=signed, top_n=3, band_n=2, sample_n=7, cofire_rate=0.6)
        for c in contexts:
            rows, lats = codes[c].nonzero(as_tuple=True)
            s.update(rows, lats, codes[c][rows, lats], torch.full((T,), c), torch.arange(T), tokens[c])
        return s

    one = stats(range(n_ctx))
    split = [list(range(n_ctx))[i::parts] for i in range(parts)]
    merged = stats(split[0])
    for part in split[1:]:
        merged.merge(stats(part))
    for name in ("fires", "hist", "cofire_fires"):
        assert torch.equal(getattr(one, name), getattr(merged, name)), name
    assert torch.allclose(one.sum, merged.sum) and torch.equal(one.max, merged.max) and torch.equal(one.min, merged.min)
    for name in ("top", "sample") + (("bottom",) if signed else ()):
        a, b = getattr(one, name).state(), getattr(merged, name).state()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert one.top_tokens(4) == merged.top_tokens(4) and one.cofiring(4) == merged.cofiring(4)


def store_rows(path):
    db = sqlite3.connect(path)
    tables = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
              for t in ("tokens", "contexts", "features", "examples", "token_features", "explanations")}
    tables["meta"] = [r for r in db.execute("SELECT * FROM meta ORDER BY 1") if r[0] != "built"]
    db.close()
    return tables


def test_a_killed_build_leaves_the_old_store_and_a_rerun_gives_the_same_store(topk_run, tmp_path):
    run = tmp_path / "k"
    shutil.copytree(topk_run.run_dir, run, ignore=shutil.ignore_patterns(".lock"))
    before = store_rows(run / FILENAME)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "featurekit", "features", str(run), "--quiet"]
    began = time.time()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    duration = time.time() - began
    assert store_rows(run / FILENAME) == before  # a rebuild of the same run gives the same store
    for delay in (0.3 * duration, 0.6 * duration, 0.9 * duration):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert store_rows(run / FILENAME) == before  # killed at any point: the old store, whole
        FeatureStore(run).close()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)  # sweeps the killed build's temp file
    assert store_rows(run / FILENAME) == before and not list(run.glob(".*.tmp"))


def test_torchrun_shards_give_the_same_store(topk_run, tmp_path):
    from ..train.test_distributed import free_port

    run = tmp_path / "d"
    shutil.copytree(topk_run.run_dir, run, ignore=shutil.ignore_patterns(".lock"))
    (run / FILENAME).unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           "-m", "featurekit", "features", str(run), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("feature store:") == 1
    assert store_rows(run / FILENAME) == store_rows(topk_run.run_dir / FILENAME)


def test_foreign_or_newer_files_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / FILENAME).write_text("not a database")
    with pytest.raises(FeaturekitError, match="not a featurekit feature store"):
        FeatureStore(tmp_path / "a")
    db = sqlite3.connect(tmp_path / "b.sqlite")
    db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '99'), ('complete', 'true')")
    db.commit()
    db.close()
    with pytest.raises(FeaturekitError, match="newer than this featurekit reads"):
        FeatureStore(tmp_path / "b.sqlite")
    with pytest.raises(FeaturekitError, match="featurekit features RUN_DIR"):
        FeatureStore(tmp_path / "missing")


def test_the_run_records_the_store_and_a_rerun_skips_it(topk_run, capsys):
    store = FeatureStore(topk_run.run_dir)
    assert store.meta["sources"][0]["split"] == "test" and store.meta["method"] == "topk"
    assert json.loads((topk_run.run_dir / "config.json").read_text())["features"]["tokens"] == 3000
    cfg = load_config(topk_run.run_dir / "config.json")
    assert pipeline.store_complete(pipeline.load_run_config(topk_run.run_dir)) and cfg.features.top_n == 5
