"""Shared beds: tiny judge models (judge_models.py); the tiny run with its feature store is tests/conftest.py's `tiny_run`."""

import pytest

from featurekit.autointerp import ExampleSettings, ScoreSettings, Settings

from .judge_models import write_judge


@pytest.fixture(scope="session")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    return {kind: write_judge(root, kind) for kind in ("constant", "salad")}


def small(**changes) -> Settings:
    """Settings scaled down for the tiny run: few examples per unit, a small pool, short answers."""
    examples = ExampleSettings(n_explain=3, n_test=4, n_random=2, n_neighbour=1, n_semantic=1, min_explain=2, min_test=2,
                               semantic_candidates=32)
    return Settings(examples=examples, scoring=ScoreSettings(n_intruder=2, intruder_shown=3, logprobs=5), pool_contexts=32,
                    explain_tokens=12, **changes)
