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


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    """60 features, a fifth dead, statistics with many ties."""
    import random

    rng = random.Random(1)
    rows = []
    for f in range(60):
        fires = 0 if rng.random() < 0.2 else rng.randint(1, 5)
        stats = (None, None, None) if not fires else (rng.choice([0.5, 1.0]), rng.choice([1.0, 2.0, 3.0]), rng.choice([-1.0, 0.1]))
        rows.append((f, fires, fires / 100, *stats, {}, [], [], None, None, [], None))
    w = StoreWriter(tmp_path_factory.mktemp("random_store") / FILENAME)
    w.features(rows)
    w.meta({"schema_version": SCHEMA_VERSION, "n_latents": 60})
    s = FeatureStore(w.commit())
    yield s, rows
    s.close()


@pytest.mark.parametrize("sort", ["density", "max", "min", "fires", "id"])
@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("live_only", [True, False])
def test_list_features_pages_equal_a_sort(random_store, sort, descending, live_only):
    """Every page equals the same slice of a Python sort: by the column, ties by id in the same direction, dead features
    (no max/min) below every live one."""
    store, rows = random_store
    col = {"id": 0, "fires": 1, "density": 2, "max": 4, "min": 5}[sort]
    kept = [r for r in rows if r[1] > 0 or not live_only]
    ordered = sorted(kept, key=lambda r: (float("-inf") if r[col] is None else r[col], r[0]), reverse=descending)
    got = [row["id"] for offset in range(0, 70, 7) for row in store.list_features(sort, descending, offset, 7, live_only)]
    assert got == [r[0] for r in ordered]
    assert store.count_features(live_only) == len(kept)


def test_peaks(random_store):
    store, rows = random_store
    assert store.peaks() == [None if r[1] == 0 else max(abs(r[4]), abs(r[5])) for r in rows]


@pytest.mark.parametrize("scan", [2, 1000])
def test_search_token_equals_a_brute_force_ranking(tmp_path, monkeypatch, scan):
    """Counts summed over the matching tokens, ranked by count, then share (count / fires), then id — with short
    per-token lists (the bound and the fallback) and long ones."""
    import random

    from featurekit.features import store as store_module

    monkeypatch.setattr(store_module, "TIE_SCAN", scan)
    rng = random.Random(3)
    n = 40
    fires = [rng.randint(5, 30) for _ in range(n)]
    pairs = {(t, f): rng.randint(1, 4) for t in (1, 2, 3) for f in rng.sample(range(n), 25)}
    w = StoreWriter(tmp_path / FILENAME)
    w.tokens([(1, " Tree"), (2, "tree"), (3, " river")])
    w.features([(f, fires[f], fires[f] / 1000, 1.0, 2.0, 0.5, {}, [], [], None, None, [], None) for f in range(n)])
    w.token_features([(t, f, c, 0.5 * t) for (t, f), c in pairs.items()])
    w.meta({"schema_version": SCHEMA_VERSION, "n_latents": n})
    store = FeatureStore(w.commit())
    for text, tokens in ((" Tree", {1}), ("TREE", {1, 2}), (" river", {3})):
        total = {}
        for (t, f), c in pairs.items():
            if t in tokens:
                total[f] = total.get(f, 0) + c
        want = sorted(total, key=lambda f: (-total[f], -total[f] / fires[f], f))[:2]
        if scan < 1000 and len(tokens) == 1:
            continue  # one token with a short list: ties beyond it are not all seen (documented)
        got = store.search_token(text, limit=2)
        assert [r["id"] for r in got] == want, text
        assert [r["count"] for r in got] == [total[f] for f in want]
        assert [r["share"] for r in got] == pytest.approx([total[f] / fires[f] for f in want])
    store.close()
