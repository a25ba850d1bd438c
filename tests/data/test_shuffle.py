"""ShuffleBuffer and iter_epochs: completeness, batch sizes, determinism, bounded reading, errors."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.data.batch import ActivationBatch
from featurekit.data.cache import write_cache
from featurekit.data.shuffle import ShuffleBuffer, batches_per_epoch, iter_epochs
from featurekit.errors import FeaturekitError

SITE = "resid_post.0"


def make_stream(sizes, d=3, dtype=torch.float32):
    """Batches whose row i is [i, i, ...]: a row's value identifies it."""
    out, start = [], 0
    for n in sizes:
        idx = torch.arange(start, start + n)
        acts = idx[:, None].repeat(1, d).to(dtype)
        out.append(ActivationBatch(acts={SITE: acts}, token_ids=idx, context_idx=idx, position=idx))
        start += n
    return out


def ids(batches):
    return [int(v) for b in batches for v in b[:, 0]]


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), max_size=10), buffer_tokens=st.integers(1, 40),
       batch_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1), drop_last=st.booleans())
def test_every_row_once_and_batch_sizes(sizes, buffer_tokens, batch_frac, seed, drop_last):
    batch_size = max(1, int(batch_frac * buffer_tokens))
    n = sum(sizes)
    out = list(ShuffleBuffer(make_stream(sizes), SITE, buffer_tokens, batch_size, seed, drop_last=drop_last))
    assert all(b.dtype == torch.float32 and b.shape[1] == 3 for b in out)
    assert all(b.shape[0] == batch_size for b in out[:-1])
    got = ids(out)
    assert len(got) == len(set(got))
    assert len(out) == batches_per_epoch(n, batch_size, drop_last)
    if drop_last:
        assert all(b.shape[0] == batch_size for b in out)
        assert set(got) <= set(range(n)) and len(got) == n // batch_size * batch_size
    else:
        assert sorted(got) == list(range(n))


def test_deterministic_by_seed_and_seeds_differ():
    def run(seed):
        return ids(ShuffleBuffer(make_stream([37] * 8), SITE, 64, 8, seed))

    assert run(3) == run(3)
    assert run(3) != run(4)
    assert run(3) != sorted(run(3))  # actually shuffled


def test_reads_a_bounded_prefix_of_the_stream():
    consumed = 0

    def endless():
        nonlocal consumed
        for start in itertools.count(0, 10):
            consumed += 1
            idx = torch.arange(start, start + 10)
            yield ActivationBatch(acts={SITE: torch.randn(10, 4)}, token_ids=idx, context_idx=idx, position=idx)

    it = iter(ShuffleBuffer(endless(), SITE, buffer_tokens=100, batch_size=10, seed=0))
    for _ in range(50):
        next(it)
    # 50 batches of 10 rows = 500 rows out; the buffer never holds more than 100 rows.
    assert consumed <= (500 + 100) // 10 + 1


def test_mixes_across_input_batches():
    first = next(iter(ShuffleBuffer(make_stream([10] * 10), SITE, 100, 10, seed=0)))
    assert len({int(v) // 10 for v in first[:, 0]}) > 3


def test_bf16_input_comes_out_float32():
    out = list(ShuffleBuffer(make_stream([16], dtype=torch.bfloat16), SITE, 8, 4, seed=1))
    assert all(b.dtype == torch.float32 for b in out) and sorted(ids(out)) == list(range(16))


def test_errors():
    bad = make_stream([4, 4])
    bad[1].acts[SITE][2, 1] = float("nan")
    with pytest.raises(FeaturekitError, match=r"resid_post\.0.*NaN/Inf.*dtype.*position 0"):
        list(ShuffleBuffer(bad, SITE, 4, 2, seed=0))
    with pytest.raises(FeaturekitError, match="not in the activation batches"):
        list(ShuffleBuffer(make_stream([4]), "mlp_out.3", 4, 2, seed=0))
    with pytest.raises(FeaturekitError, match="buffer_tokens"):
        ShuffleBuffer(make_stream([4]), SITE, 4, 8, seed=0)
    assert list(ShuffleBuffer([], SITE, 4, 2, seed=0)) == []


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path, make_stream([13, 29, 8, 50]), {"model": "t", "sites": [SITE]}, shard_tokens=20)


def test_iter_epochs_covers_each_epoch_and_differs(cache):
    out = list(iter_epochs(cache, SITE, epochs=3, buffer_tokens=32, batch_size=5, seed=7, drop_last=False))
    per_epoch = batches_per_epoch(100, 5, drop_last=False)
    assert len(out) == 3 * per_epoch
    epochs = [ids(out[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    assert all(sorted(e) == list(range(100)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = list(iter_epochs(cache, SITE, epochs=3, buffer_tokens=32, batch_size=5, seed=7, drop_last=False))
    assert all(torch.equal(a, b) for a, b in zip(out, again))


@pytest.mark.parametrize("skip", [0, 3, 14, 15, 29, 45, 60])
def test_iter_epochs_resume_by_skipping(cache, skip):
    kwargs = dict(epochs=3, buffer_tokens=24, batch_size=7, seed=1)
    full = list(iter_epochs(cache, SITE, **kwargs))
    assert len(full) == 3 * (100 // 7)
    resumed = list(iter_epochs(cache, SITE, skip_batches=skip, **kwargs))
    assert len(resumed) == max(0, len(full) - skip)
    assert all(torch.equal(a, b) for a, b in zip(full[skip:], resumed))


def test_several_sites_are_shuffled_as_one_row(tmp_path):
    """A site and its gradient (or any two sites) stay paired: row i is [a_i | -a_i] after shuffling,
    from memory and from a cache read by iter_epochs."""
    stream = make_stream([7, 13, 5])
    for b in stream:
        b.acts["resid_post.0@grad"] = -b.acts[SITE][:, :2]
        b.context_idx, b.position = b.context_idx.clone(), b.position.clone()
    out = list(ShuffleBuffer(stream, [SITE, "resid_post.0@grad"], 8, 4, seed=3, drop_last=False))
    rows = torch.cat(out)
    assert rows.shape == (25, 5) and torch.equal(rows[:, 3:], -rows[:, :2])
    assert sorted(ids(out)) == list(range(25)) and ids(out) != list(range(25))
    cache = write_cache(tmp_path / "c", stream, {"m": 1}, shard_tokens=6)
    epochs = torch.cat(list(iter_epochs(cache, [SITE, "resid_post.0@grad"], 2, 8, 4, seed=0)))
    assert epochs.shape == (48, 5) and torch.equal(epochs[:, 3:], -epochs[:, :2])
    with pytest.raises(FeaturekitError, match="not in the cache"):
        list(iter_epochs(cache, [SITE, "resid_post.9@grad"], 1, 8, 4, seed=0))
