"""The thread probe: its schedule and choice, and a CPU run that takes its thread count from its own first steps
(train/threads.py), keeps it through a resume, and trains the same weights as a run at a fixed count."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from featurekit.config import TrainConfig
from featurekit.dictionaries import TopKSAE
from featurekit.errors import FeaturekitError
from featurekit.train import Trainer
from featurekit.train.threads import MIN_RUN_MULTIPLE, ThreadProbe, candidates

from .synthetic import sample, true_features


@given(st.integers(1, 512))
def test_candidates_are_the_powers_of_two_below_the_top_then_the_top(top):
    counts = candidates(top)
    assert counts[0] == 1 and counts[-1] == top
    assert counts == sorted(set(counts))
    assert set(counts[:-1]) == {1 << i for i in range(10) if 1 << i < top}  # every power of two below the top


def test_probe_skips_the_warm_up_round_and_keeps_the_best_time():
    probe = ThreadProbe(4)
    assert probe.schedule == [1, 2, 4] * 3
    # warm-up round (untimed: 4 threads looks fastest there), then two timed rounds
    seconds = {0: 9.0, 1: 9.0, 2: 0.1, 3: 1.0, 4: 0.7, 5: 0.9, 6: 1.2, 7: 0.8, 8: 0.75}
    for step in range(len(probe.schedule)):
        assert probe.chosen is None
        probe.record(seconds[step])
    assert probe.best == {1: 1.0, 2: 0.7, 4: 0.75}
    assert probe.chosen == 2


def test_probe_tie_goes_to_fewer_threads():
    probe = ThreadProbe(2)
    for _ in probe.schedule:
        probe.record(0.5)
    assert probe.chosen == 1


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_no_probe_where_the_count_is_not_ours_to_choose(two_threads):
    cpu, long = torch.device("cpu"), 10_000
    assert ThreadProbe.for_run(None, cpu, long, 1) is not None
    assert ThreadProbe.for_run(2, cpu, long, 1) is None  # train.threads set
    assert ThreadProbe.for_run(None, torch.device("cuda"), long, 1) is None
    assert ThreadProbe.for_run(None, cpu, long, 2) is None  # torchrun
    assert ThreadProbe.for_run(None, cpu, MIN_RUN_MULTIPLE * 6 - 1, 1) is None  # too short to pay
    torch.set_num_threads(1)
    assert ThreadProbe.for_run(None, cpu, long, 1) is None


def train(root, features, steps, threads=None, until=None, resume=False):
    """(dictionary, trainer, the thread count each step's forward ran at, fit's summary)."""
    sae = TopKSAE(24, 96, k=4, seed=0)
    ran: list[int] = []
    sae.register_forward_pre_hook(lambda module, args: ran.append(torch.get_num_threads()))
    cfg = TrainConfig(lr=3e-3, log_every=5, checkpoint_every=10, dead_tokens=4096, threads=threads)
    trainer = Trainer(sae, cfg, root, total_steps=steps)
    if resume:
        trainer.resume()
    else:
        trainer.init_from_data(sample(features, 2048, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(3)
    batches = [sample(features, 256, gen) for _ in range(steps)][trainer.step:]
    ran.clear()  # init_from_data's forwards
    if until is None:
        return sae, trainer, ran, trainer.fit(batches, progress=False)
    with pytest.raises(FeaturekitError, match="stream ended"):  # a run cut off after `until` steps (checkpointed there)
        trainer.fit(batches[:until], progress=False)
    return sae, trainer, ran, None


def test_a_cpu_run_probes_then_keeps_its_choice_through_a_resume(tmp_path, two_threads):
    features, steps = true_features(48, 24), 40
    sae, trainer, ran, summary = train(tmp_path / "probed", features, steps)
    probe_steps = len(ThreadProbe(2).schedule)
    assert len(ran) == steps and ran[:probe_steps] == [1, 2] * 3
    chosen = summary["threads"]
    assert chosen in (1, 2) and trainer.threads == chosen
    assert set(ran[probe_steps:]) == {chosen}
    assert json.loads((tmp_path / "probed" / "checkpoint" / "state.json").read_text())["threads"] == chosen

    # the same run at a fixed count trains the same weights (thread counts change only summation order)
    torch.set_num_threads(2)  # as the pipeline does for train.threads
    fixed, _, _, fixed_summary = train(tmp_path / "fixed", features, steps, threads=2)
    assert fixed_summary["threads"] == 2
    for name, value in fixed.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)

    # cut off after the probe and resumed: the resumed half runs at the first half's choice, without a new probe
    _, first, _, _ = train(tmp_path / "cut", features, steps, until=20)
    assert first.step == 20 and first.threads in (1, 2)
    torch.set_num_threads(2)  # a fresh process at torch's default
    resumed, second, ran, _ = train(tmp_path / "cut", features, steps, resume=True)
    assert second.threads == first.threads and len(ran) == steps - 20
    assert set(ran) == {first.threads}
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_run_with_threads_set_never_changes_them(tmp_path, two_threads):
    features = true_features(48, 24)
    _, trainer, ran, summary = train(tmp_path, features, 40, threads=2)
    assert set(ran) == {2} and summary["threads"] == 2 and trainer.threads is None
