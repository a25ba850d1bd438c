"""The feature store's read queries that the explorer adds (`densities`, `summaries`) and its search by token,
on a small store written with `StoreWriter`."""

from __future__ import annotations

import pytest

from featurekit.features.store import FILENAME, SCHEMA_VERSION, FeatureStore, StoreWriter


@pytest.fixture
def store(tmp_path):
    w = StoreWriter(tmp_path / FILENAME)
    w.tokens([(1, " Paris"), (2, "paris"), (3, " the"), (4, "<b>")])
    w.features([(0, 5, 0.05, 1.0, 2.0, 0.5, {}, [(1, 4, 1.0), (3, 1, 0.5), (4, 1, 0.2), (2, 1, 0.1)], [], None, None, [], None),
                (1, 0, 0.0, None, None, None, {}, [], [], None, None, [], None),
                (2, 9, 0.09, 1.0, 3.0, 0.5, {}, [(3, 9, 1.0)], [], None, None, [], None)])
    w.token_features([(1, 0, 4, 1.0), (2, 0, 1, 0.1), (3, 0, 1, 0.5), (3, 2, 9, 1.0), (2, 2, 3, 2.0)])
    w.db.executemany("INSERT INTO explanations VALUES (?, ?, ?, ?, ?)",
                     [(0, "a", "capital cities", 0.4, None), (0, "b", "Paris, the city", 0.9, None), (0, "c", "unscored", None, None),
                      (2, "a", "the word the", None, None)])
    w.meta({"schema_version": SCHEMA_VERSION, "n_latents": 3})
    w.commit()
    s = FeatureStore(tmp_path)
    yield s
    s.close()


def test_densities_by_id(store):
    assert store.densities() == [0.05, 0.0, 0.09]


def test_summaries(store):
    s = store.summaries([2, 0, 0, 7], n_tokens=3)
    assert sorted(s) == [0, 2]  # unknown ids are left out
    assert s[0]["tokens"] == [" Paris", " the", "<b>"] and s[0]["max"] == 2.0 and s[0]["density"] == 0.05
    assert s[0]["explanation"] == "Paris, the city"  # the best scored one
    assert s[2]["explanation"] == "the word the"  # unscored, but the only one
    assert store.summaries([1]) == {1: {"density": 0.0, "max": None, "min": None, "tokens": [], "explanation": None}}
    assert store.summaries([]) == {}


def test_search_token_exact_then_folded(store):
    assert [r["id"] for r in store.search_token(" Paris")] == [0]
    assert [(r["id"], r["count"]) for r in store.search_token("PARIS")] == [(0, 5), (2, 3)]  # " Paris" and "paris"
    assert [r["id"] for r in store.search_token(" the")] == [2, 0]
    assert store.search_token("London") == []
