"""Training with torch.distributed: 2 CPU processes on gloo against 1 process on the same global batch.

One module-scoped launch runs both layouts (process start-up dominates the cost); each test checks one."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from featurekit.dictionaries import load
from featurekit.train import distributed as D

from . import distributed_workers as W

TOL = {"rtol": 1e-5, "atol": 1e-5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(W.worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out, W.reference(out)


def test_data_parallel_matches_one_process_on_the_global_batch(runs):
    out, ref = runs
    assert any(row["aux_loss"] > 0 for row in ref["dp_metrics"]), "setup: the aux-k loss should be active"
    got = W.metrics(out / "dp")
    assert [r["step"] for r in got] == [r["step"] for r in ref["dp_metrics"]] and len(got) == W.STEPS
    for a, b in zip(got, ref["dp_metrics"]):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "recon_loss", "aux_loss", "fvu", "l0", "dead_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    s0, s1 = (torch.load(out / f"dp_state_{r}.pt") for r in (0, 1))
    for name, want in ref["dp_state"].items():
        torch.testing.assert_close(s0[name], want, **TOL)
        torch.testing.assert_close(s1[name], s0[name], rtol=0, atol=0)  # the replicas never drift apart
    assert not (out / "dp_rank1" / "metrics.jsonl").exists() and not (out / "dp_rank1" / "checkpoint").exists()
    assert (out / "dp" / "checkpoint").exists()


def test_latent_sharded_topk_matches_unsharded(runs):
    out, ref = runs
    got = torch.load(out / "shard.pt")
    assert got["init_equal"] and got["local_latents"] == W.N_LATENTS // 2
    torch.testing.assert_close(got["first_x_hat"], ref["first_x_hat"], **TOL)
    for name, want in ref["first_grads"].items():  # each rank's gradients are its slice of the 1-process ones
        torch.testing.assert_close(got["first_grads"][name], want, **TOL)
    for rank in (0, 1):  # every rank computes the same loss
        for a, b in zip(W.metrics(out / f"shard_rank{rank}"), ref["shard_metrics"]):
            for key in ("loss", "recon_loss", "fvu", "l0"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (rank, a["step"], key)
    for name, want in ref["shard_state"].items():
        torch.testing.assert_close(got["state"][name], want, **TOL)
    assert not torch.allclose(got["state"]["W_dec"], ref["init_state"]["W_dec"])  # it did train


def test_saved_sharded_dictionary_loads_as_topk_and_encodes_identically(runs):
    out, ref = runs
    got = torch.load(out / "shard.pt")
    loaded = load(out / "dictionary")
    assert loaded.method == "topk" and loaded.n_latents == W.N_LATENTS and loaded.k == W.K
    with torch.no_grad():
        codes = loaded.encode(got["x"])
        torch.testing.assert_close(codes, got["codes"], **TOL)  # the sharded encode, gathered
        torch.testing.assert_close(loaded.decode(codes), got["recon"], **TOL)
        assert ((codes != 0).sum(-1) <= W.K).all() and (codes != 0).any()


def test_single_process_helpers_are_no_ops():
    assert not D.is_initialized() and D.world_size() == 1 and D.rank() == 0 and D.is_main()
    assert not D.data_parallel() and D.writes()
    x = torch.randn(8, 3)
    assert torch.equal(D.batch_sum(x), x) and D.global_rows(8) == 8
    torch.testing.assert_close(D.centered_sum_sq(x), (x - x.mean(0)).pow(2).sum())
    assert [t.shape[0] for t in D.shard_batches([x], r=1, n=2)] == [4]
    torch.testing.assert_close(D.shard_rows(x, 1, 2), x[4:])
    with pytest.raises(Exception, match="equal shards"):
        D.shard_rows(x, 0, 3)
