"""data.prefetch: the background producer yields exactly the plain iterator's items in order, re-raises the
producer's exception in the consumer, sets the producer's own torch threads, and leaves no thread behind."""

import gc
import itertools
import threading
import time

import pytest
import torch

from featurekit.data.harvest import harvest
from featurekit.data.prefetch import Prefetcher, split_threads
from featurekit.data.shuffle import ShuffleBuffer
from featurekit.data.tokens import pack, token_mask
from featurekit.errors import FeaturekitError
from featurekit.models import load_model

SITES = ["resid_post.1", "mlp_out.0"]


@pytest.fixture(scope="module")
def harvest_setup(tiny):
    loaded = load_model(str(tiny / "model"))
    ids = pack([(tiny / "text.txt").read_text()], loaded.tokenizer, 16, max_contexts=40)
    mask = token_mask(ids, loaded.tokenizer)
    return loaded.model, ids, mask


def _batches(setup):
    model, ids, mask = setup
    return harvest(model, ids, SITES, batch_size=6, mask=mask, progress=False, max_norm_multiple=50.0)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "featurekit-prefetch"]


def test_prefetched_harvest_is_identical_to_the_plain_one(harvest_setup):
    plain = list(_batches(harvest_setup))
    with Prefetcher(_batches(harvest_setup), depth=2) as pre:
        fetched = list(pre)
    assert len(fetched) == len(plain) == 7
    for a, b in zip(plain, fetched):
        assert set(a.acts) == set(b.acts) == set(SITES)
        for site in SITES:
            assert torch.equal(a.acts[site], b.acts[site])
        for key in ("token_ids", "context_idx", "position"):
            assert torch.equal(getattr(a, key), getattr(b, key))
    assert not pre.alive and _prefetch_threads() == []


def test_prefetched_shuffled_stream_is_identical(harvest_setup):
    """The pipeline's streamed path prefetches the shuffled batches: same tensors, same order."""
    def shuffled():
        return ShuffleBuffer(_batches(harvest_setup), SITES, buffer_tokens=128, batch_size=32, seed=3)

    plain = list(shuffled())
    fetched = list(Prefetcher(shuffled(), depth=3))
    assert len(plain) == len(fetched) > 5
    assert all(torch.equal(a, b) for a, b in zip(plain, fetched))


def test_producer_exception_is_raised_in_the_consumer_after_the_earlier_items():
    error = ValueError("boom")

    def source():
        yield from range(3)
        raise error

    pre = Prefetcher(source(), depth=1)
    assert [next(pre) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError) as info:
        next(pre)
    assert info.value is error
    with pytest.raises(StopIteration):
        next(pre)
    assert not pre.alive


def test_harvest_error_in_the_producer_reaches_the_consumer(harvest_setup):
    model, ids, mask = harvest_setup
    with pytest.raises(FeaturekitError, match="resid_post.9"):
        list(Prefetcher(harvest(model, ids, ["resid_post.9"], batch_size=6, mask=mask, progress=False)))
    assert _prefetch_threads() == []


@pytest.mark.parametrize("how", ["close", "gc", "islice"])
def test_early_exit_stops_the_thread_and_closes_the_source(harvest_setup, how):
    closed_in = []

    def source():
        try:
            yield from _batches(harvest_setup)
        finally:
            closed_in.append(threading.current_thread().name)

    if how == "islice":  # as run_train takes its init sample: the Prefetcher is dropped after a few items
        first = list(itertools.islice(Prefetcher(source(), depth=2), 2))
        assert len(first) == 2
    else:
        pre = Prefetcher(source(), depth=2)
        next(pre)
        thread = pre._thread
        if how == "close":
            pre.close()
            pre.close()  # idempotent
            with pytest.raises(StopIteration):
                next(pre)
        else:
            del pre
            gc.collect()
        assert not thread.is_alive()
    assert _prefetch_threads() == []
    assert closed_in == ["featurekit-prefetch"]  # the generator's finally ran, in the producer thread


def test_producer_stays_at_most_depth_items_ahead():
    produced = []
    full = threading.Event()

    def source():
        for i in range(100):
            produced.append(i)
            if len(produced) == 4:
                full.set()  # 3 queued, this one about to wait for room
            yield i

    pre = Prefetcher(source(), depth=3)
    assert full.wait(10)
    time.sleep(0.2)  # nothing is consumed, so the producer cannot go on, however long it is given
    assert len(produced) == 4
    assert list(pre) == list(range(100))


def test_producer_sets_its_own_thread_count():
    torch.set_num_threads(2)
    try:
        seen = list(Prefetcher((torch.get_num_threads() for _ in range(2)), threads=1))
        assert seen == [1, 1] and torch.get_num_threads() == 2  # the consumer's count is untouched
    finally:
        torch.set_num_threads(1)


def test_split_threads_and_arguments():
    assert split_threads(1) == (1, 1) and split_threads(2) == (1, 1) and split_threads(3) == (1, 2)
    assert split_threads(16) == (8, 8) and split_threads(0) == (1, 1)
    with pytest.raises(FeaturekitError, match="depth"):
        Prefetcher([], depth=0)
    with pytest.raises(FeaturekitError, match="threads"):
        Prefetcher([], threads=0)
    assert list(Prefetcher([])) == []


def test_streamed_training_is_deterministic_and_leaves_no_thread(tiny, tmp_path):
    """run_train without a cache harvests through the Prefetcher: two runs give bit-identical weights, no
    producer thread is left behind, and the caller's torch thread count is restored."""
    from featurekit import pipeline
    from featurekit.config import load_config

    weights = []
    for name in ("a", "b"):
        cfg = pipeline.resolve(load_config(None, [
            f"out_dir={tmp_path}", f"name={name}", f"model.name={tiny / 'model'}", "model.dtype=float32",
            f"data.source={tiny / 'text.txt'}", "site=resid_post.1", "data.context_len=16", "data.train_tokens=3000",
            "data.cache=false", "dictionary.n_latents=64", "dictionary.k=4", "train.batch_size=256",
            "train.buffer_tokens=1024", "train.epochs=2", "train.threads=2"]))
        torch.set_num_threads(1)
        try:
            sae = pipeline.run_train(cfg, progress=False)
            assert torch.get_num_threads() == 2  # train.threads, as before the producer/consumer split
        finally:
            torch.set_num_threads(1)
        weights.append({k: v.clone() for k, v in sae.state_dict().items()})
        assert _prefetch_threads() == []
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
