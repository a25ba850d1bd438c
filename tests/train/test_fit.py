"""The fitter driver (`train.fit.fit_stream`): steps, the log, checkpoints and an exact resume after a crash."""

import json
from types import SimpleNamespace

import pytest
import torch

from featurekit.dictionaries.itda import ITDAFitter
from featurekit.errors import FeaturekitError
from featurekit.train.fit import fit_stream

from .synthetic import batches, true_features

SITE = "resid_post.0"
TC = SimpleNamespace(batch_size=64, log_every=2, checkpoint_every=3)


def fitter():
    return ITDAFitter(16, k=4, threshold=2e-3, chunk_tokens=32)


def stream(crash_after=None):
    for i, b in enumerate(batches(true_features(24, 16), 6, 100, SITE)):
        if crash_after is not None and i == crash_after:
            raise KeyboardInterrupt("killed")
        yield b


def test_steps_log_and_checkpoint(tmp_path):
    f = fitter()
    summary = fit_stream(f, stream(), SITE, tmp_path, TC, digest="d", progress=False)
    assert summary["tokens"] == 600 and f.tokens_seen == 600
    assert summary["steps"] == 6 * 2  # each 100-token batch is cut into 64 + 36
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12] and rows[-1]["n_atoms"] == f.n_atoms
    assert rows[-1]["fvu"] < rows[0]["fvu"]  # later tokens are reconstructed better by the grown dictionary
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["tokens"] == 600


def test_resume_after_a_crash_gives_the_same_dictionary(tmp_path):
    ref = fitter()
    fit_stream(ref, stream(), SITE, tmp_path / "ref", TC, digest="d", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit_stream(fitter(), stream(crash_after=4), SITE, tmp_path / "run", TC, digest="d", progress=False)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert meta["step"] == 6 and meta["tokens"] == 300  # the checkpoint of step 6 (4 batches = 8 steps were read)
    with pytest.raises(FeaturekitError, match="no fitter checkpoint"):
        fit_stream(fitter(), stream(), SITE, tmp_path / "run", TC, digest="other", resume=True, progress=False)
    resumed = fitter()
    fit_stream(resumed, stream(), SITE, tmp_path / "run", TC, digest="d", resume=True, progress=False)
    assert resumed.tokens_seen == 600 and torch.equal(resumed.labels, ref.labels)
    torch.testing.assert_close(resumed.atoms, ref.atoms)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # rows after the checkpoint were dropped and written again
