"""The fast training path (probed MKL/oneDNN encoder GEMM, two-stage row top-k, SDDMM recompute, CSR
encoder backward, sparse decoder, sparse JumpReLU, no dense code matrix, fused Adam) trains the same model
as the plain dense path (`plain_kernels()`: addmm, torch.topk, dense autograd gathers and decoder, unfused
Adam), within fp32 tolerance; bf16 within a documented tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.config import TrainConfig
from featurekit.dictionaries import METHODS
from featurekit.dictionaries.kernels import KernelChoice, certified, forward, gemm, jumprelu, plain_kernels, selection
from featurekit.dictionaries.kernels.gemm import encoder_preact, mm_bias, onednn_available, onednn_linear
from featurekit.dictionaries.kernels.selection import row_topk
from featurekit.dictionaries.kernels.sparse import (
    count_true,
    gather_1d,
    gather_linear,
    mask_to_sparse,
    pairs,
    pairs_at,
    sparse_decode,
    weight_grad,
)
from featurekit.errors import FeaturekitError
from featurekit.train import Trainer
from featurekit.train.trainer import RECON_LOSSES

from .synthetic import sample, true_features

D, F, K, B, STEPS = 32, 256, 8, 512, 15
ARGS = {"topk": {"k": K}, "batchtopk": {"k": K}, "abstopk": {"k": K}, "jumprelu": {"l0_coefficient": 0.5},
        "jumprelu-dense": {"l0_coefficient": 0.5}}


def _train(method: str, tmp_path, precision: str = "fp32", device: str = "cpu", **train) -> tuple[list[float], dict[str, torch.Tensor]]:
    """`method`'s loss curve and final state over STEPS steps on `device` (tests/train/test_cuda.py: on a GPU)."""
    gen = torch.Generator().manual_seed(3)
    feats = true_features(64, D, seed=5)
    data = [sample(feats, B, gen).to(device) for _ in range(STEPS)]
    sae = METHODS[method.removesuffix("-dense")](D, F, seed=0, **ARGS[method]).to(device)
    cfg = TrainConfig(batch_size=B, lr=3e-3, warmup_steps=2, precision="fp32" if precision == "plain" else precision, **train)
    trainer = Trainer(sae, cfg, tmp_path / method, STEPS)
    trainer.init_from_data(torch.cat(data[:2]))
    recon = RECON_LOSSES[sae.recon_loss]
    rows = [trainer.train_step(x, recon) for x in data]
    losses = [row["loss"] for row in rows]
    if train.get("aux_zipf_coef"):
        assert any(row.get("aux_zipf_loss", 0) > 0 for row in rows), "setup: the aux_zipf loss should be active"
    if precision != "plain" and method != "batchtopk":  # BatchTopK falls back to dense when a row holds > 4k picks
        dense = method.endswith("-dense")  # JumpReLU's fused dense path (`_DenseJumpReLU`), taken past 4 % live pairs
        assert (sae(data[0] * sae.input_scale).idx is None) == dense  # which fast path ran
    return losses, {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()}


@pytest.fixture(autouse=True)
def _jumprelu_path(request, monkeypatch):
    """"jumprelu" runs the sparse kernels at every step, "jumprelu-dense" the fused dense path."""
    method = request.node.callspec.params.get("method", "") if hasattr(request.node, "callspec") else ""
    if method.startswith("jumprelu"):
        monkeypatch.setattr(jumprelu, "SPARSE_MAX_DENSITY", 0.0 if method.endswith("-dense") else 1.0)


@pytest.mark.parametrize("method", sorted(ARGS))
def test_fast_path_trains_like_the_plain_dense_path(method, tmp_path):
    fast_losses, fast_state = _train(method, tmp_path / "fast")
    with plain_kernels():
        plain_losses, plain_state = _train(method, tmp_path / "plain", precision="plain")
    assert fast_losses[-1] < fast_losses[0]  # it learns
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-6)
    for name, value in plain_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-3, atol=1e-4, msg=f"{method}.{name}")


@pytest.mark.parametrize("method", ["topk", "jumprelu", "jumprelu-dense"])
def test_bf16_selection_stays_within_its_documented_tolerance(method, tmp_path):
    fp32, _ = _train(method, tmp_path / "fp32")
    bf16, _ = _train(method, tmp_path / "bf16", precision="bf16")
    rel = (torch.tensor(bf16) - torch.tensor(fp32)).abs() / torch.tensor(fp32)
    assert float(rel.max()) < 0.02  # BENCHMARKS.md: bf16 loss curves within 2 % of fp32


def test_bf16_selection_keeps_exact_fp32_values():
    gen = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(64, D, generator=gen), torch.randn(F, D, generator=gen), torch.randn(F, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre = encoder_preact(x, W, b)
    assert pre.dtype == torch.bfloat16
    idx = pre.float().topk(K, dim=-1).indices
    values = gather_linear(x, W, b, idx, pre)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, (x @ W.T + b).gather(-1, idx), rtol=1e-5, atol=1e-5)


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(FeaturekitError, match="precision"):
        Trainer(METHODS["topk"](D, F, k=K), TrainConfig(precision="fp8"), tmp_path, 1)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), rows=st.integers(1, 30), k=st.integers(1, 6), d=st.integers(1, 9), seed=st.integers(0, 999))
def test_csr_weight_gradient_equals_the_dense_sum(n, rows, k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (n, k), generator=gen)  # duplicates allowed
    grad, x = torch.randn(n, k, generator=gen), torch.randn(n, d, generator=gen)
    dense = torch.zeros(n, rows).scatter_add_(-1, idx, grad).T @ x
    r, _, c, _ = pairs(idx, None)
    torch.testing.assert_close(weight_grad(grad.flatten(), r, c, x, rows), dense, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 50), f=st.integers(1, 70), d=st.integers(1, 20), seed=st.integers(0, 999))
def test_encoder_preact_equals_addmm(n, f, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(n, d, generator=gen), torch.randn(f, d, generator=gen), torch.randn(f, generator=gen)
    torch.testing.assert_close(encoder_preact(x, W, b), torch.addmm(b, x, W.T), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear")
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 50), f=st.integers(1, 70), d=st.integers(1, 20), seed=st.integers(0, 999))
def test_both_cpu_gemm_backends_agree(n, f, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(n, d, generator=gen), torch.randn(f, d, generator=gen), torch.randn(f, generator=gen)
    torch.testing.assert_close(onednn_linear(x, W, b, torch.float32), mm_bias(x, W, b, torch.float32), rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), width=st.sampled_from([7, 64, 96, 256, 1024, 4096]), k=st.integers(1, 40),
       levels=st.sampled_from([0, 3, 50]), masked=st.booleans(), bf16=st.booleans(), shift=st.sampled_from([0.0, -3.0]),
       seed=st.integers(0, 999))
def test_row_topk_selects_the_top_k_values(n, width, k, levels, masked, bf16, shift, seed):
    """Same values as torch.topk (as multisets, ties included), at the columns it names, distinct columns;
    bf16 scores too (ranked as int16 bit patterns), rows with a negative k-th value included."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, width)
    scores = torch.randn(n, width, generator=gen) + shift
    if levels:  # heavy ties: a few distinct values only
        scores = torch.randint(-1, levels, (n, width), generator=gen).float() + shift
    scores = scores.bfloat16() if bf16 else scores
    if masked:  # as aux-k masks live latents
        scores = scores.masked_fill(torch.rand(n, width, generator=gen) < 0.7, float("-inf"))
    values, idx = row_topk(scores, k)
    assert values.shape == idx.shape == (n, k)
    torch.testing.assert_close(values.sort(-1).values, scores.topk(k, dim=-1).values.sort(-1).values)
    torch.testing.assert_close(scores.gather(1, idx), values)
    assert all(len(set(row.tolist())) == k for row in idx)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), f=st.integers(1, 50), k=st.integers(1, 8), d=st.integers(1, 12), ragged=st.booleans(),
       seed=st.integers(0, 999))
def test_sddmm_recompute_equals_the_gathered_product(n, f, k, d, ragged, seed):
    """All slots, or only the kept ones (ragged rows, some empty); duplicate columns allowed."""
    gen = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(n, d, generator=gen), torch.randn(f, d, generator=gen), torch.randn(f, generator=gen)
    idx = torch.randint(0, f, (n, k), generator=gen)
    keep = torch.rand(n, k, generator=gen) < 0.6 if ragged else None
    rows, slots, cols, crow = pairs(idx, keep)
    expected = (x @ W.T + b).gather(-1, idx)
    expected = expected.flatten() if keep is None else expected[keep]
    torch.testing.assert_close(pairs_at(x, W, b, rows, cols, crow), expected, rtol=1e-5, atol=1e-5)


def test_sddmm_value_of_a_pair_does_not_depend_on_the_other_pairs():
    """Blocks of rows go through the transposed product, or the row-major one where a pair repeats: a pair's
    value is the same bits whichever block, form or company it is computed in (the certified selection's
    recomputed rows and a resumed run rely on it), and equals the dense product's up to rounding."""
    gen = torch.Generator().manual_seed(4)
    n, f, d, k = 2600, 300, 24, 7
    x, W, b = torch.randn(n, d, generator=gen), torch.randn(f, d, generator=gen), torch.randn(f, generator=gen)
    idx = torch.randint(0, f, (n, k), generator=gen)
    idx[1100:1300] = 0  # a block where one latent has more pairs than the block has rows: row-major form
    rows, _, cols, crow = pairs(idx, None)
    whole = pairs_at(x, W, b, rows, cols, crow).view(n, k)
    torch.testing.assert_close(whole, (x @ W.T + b).gather(-1, idx), rtol=1e-5, atol=1e-5)
    for part in (slice(1000, 1300), slice(2599, 2600), slice(0, 2)):
        sub_rows, _, sub_cols, sub_crow = pairs(idx[part].flip(-1), None)  # other order, other company
        alone = pairs_at(x[part], W, b, sub_rows, sub_cols, sub_crow).view(-1, k).flip(-1)
        assert torch.equal(alone, whole[part])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), f=st.integers(1, 40), k=st.integers(1, 6), d=st.integers(1, 10), seed=st.integers(0, 999))
def test_ragged_kernels_equal_the_padded_ones_weighted_by_keep(n, f, k, d, seed):
    """gather_linear / sparse_decode with `keep`: the values and every gradient of the padded form × keep."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    params = [torch.randn(f, d, generator=gen), torch.randn(f, generator=gen), torch.randn(d, generator=gen),
              torch.randn(f, d, generator=gen)]
    idx, keep = torch.randint(0, f, (n, k), generator=gen), torch.rand(n, k, generator=gen) < 0.5
    grads = []
    for ragged in (True, False):
        W, b, shift, W_dec = [p.clone().requires_grad_() for p in params]
        pre = (x - shift.detach()) @ W.detach().T + b.detach()
        if ragged:
            values = gather_linear(x, W, b, idx, pre, shift=shift, keep=keep)
            out = sparse_decode(idx, values, W_dec, keep=keep)
        else:
            values = gather_linear(x, W, b, idx, pre, shift=shift) * keep
            out = sparse_decode(idx, values, W_dec)
        (out.square().sum() + values.sum()).backward()
        grads.append([values.detach(), out.detach()] + [p.grad for p in (W, b, shift, W_dec)])
    # fp32 summation order differs; shift's gradient −(∂b) W cancels terms up to ≈ 10⁴ times its size
    cancel = 1e-6 * (grads[1][3].abs() @ params[0].abs())
    for i, (got, want) in enumerate(zip(*grads)):
        if i == 4:
            assert ((got - want).abs() <= cancel + 1e-4 * want.abs()).all()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30), f=st.integers(1, 40), k=st.integers(1, 6), d=st.integers(1, 10), ragged=st.booleans(),
       seed=st.integers(0, 999))
def test_sparse_decode_equals_the_dense_product(n, f, k, d, ragged, seed):
    """The CPU decoder (one CSR product; backward a CSR product and a sampled product) gives the dense
    formula's output and gradients, repeated columns in a row (summed) and empty batches included."""
    gen = torch.Generator().manual_seed(seed)
    idx, keep = torch.randint(0, f, (n, k), generator=gen), torch.rand(n, k, generator=gen) < 0.6
    values0, W0, g = torch.randn(n, k, generator=gen), torch.randn(f, d, generator=gen), torch.randn(n, d, generator=gen)
    results = []
    for plain in (False, True):
        values, W_dec = values0.clone().requires_grad_(), W0.clone().requires_grad_()
        if plain:
            with plain_kernels():
                out = sparse_decode(idx, values, W_dec, keep=keep if ragged else None)
        else:
            out = sparse_decode(idx, values, W_dec, keep=keep if ragged else None)
        (out * g).sum().backward()
        results.append([out.detach(), values.grad, W_dec.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_gemm_choice_is_probed_once_and_kept_in_the_cache(tmp_path, monkeypatch):
    """A repeated run takes the kernel of the first (bit-for-bit reproducible weights on one machine)."""
    monkeypatch.setenv("FEATUREKIT_CACHE", str(tmp_path))
    x, W, b = torch.randn(64, 576), torch.randn(2048, 576), torch.randn(2048)
    first = gemm.cpu_gemm(x, W, b, torch.float32, KernelChoice())
    if not onednn_available():
        assert first is mm_bias and not (tmp_path / "gemm_choice.json").exists()
        return
    known = json.loads((tmp_path / "gemm_choice.json").read_text())
    (key, name), = known.items()
    assert gemm.GEMM_CHOICES[name] is first and "2048x576" in key
    other = next(n for n in gemm.GEMM_CHOICES if n != name)
    (tmp_path / "gemm_choice.json").write_text(json.dumps({key: other}))
    fresh = KernelChoice()  # a new run: reads the file, does not probe
    assert gemm.cpu_gemm(x, W, b, torch.float32, fresh) is gemm.GEMM_CHOICES[other]
    assert gemm.cpu_gemm(x, W[:8], b[:8], torch.float32, fresh) is mm_bias  # small: no probe
    assert fresh.as_dict()["encoder_gemm"] == "mm_bias" and fresh.as_dict()["answers"] == {key: other}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), f=st.integers(1, 300), p=st.floats(0, 1), transpose=st.booleans(), seed=st.integers(0, 999))
def test_count_true_equals_sum(n, f, p, transpose, seed):
    """The chunked byte count equals an int32 sum along either dimension, for any shape, density and
    memory order (chunks of 128 rows filled to the brim cannot overflow a byte)."""
    mask = torch.rand(n, f, generator=torch.Generator().manual_seed(seed)) < p
    mask = mask.T.contiguous().T if transpose else mask
    for dim in (0, -1):
        assert torch.equal(count_true(mask, dim), mask.sum(dim, dtype=torch.int32))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), f=st.sampled_from([40, 96, 256, 512]), d=st.integers(1, 48), k=st.integers(1, 9),
       width=st.integers(0, 40), scale=st.sampled_from([1e-3, 1.0, 30.0]), dup=st.booleans(), signed=st.booleans(),
       negative=st.booleans(), seed=st.integers(0, 999))
def test_certified_topk_is_the_exact_top_k(n, f, d, k, width, scale, dup, signed, negative, seed):
    """Through a bf16 product, certificate and fp32 fallback rows, the selection is the top k of the exact
    values (float64 reference): any width, scale, duplicated columns (exact ties), signed or not, and
    rows whose top k is negative (their int16-ordered comparisons do not hold: fp32 fallback)."""
    gen = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(n, d, generator=gen) * scale, torch.randn(f, d, generator=gen), torch.randn(f, generator=gen) * 0.1
    if negative:  # every pre-activation below 0
        b -= 2 * (x.norm(dim=1).max() * W.norm(dim=1).max() + 1)
    if dup:
        W[1::2], b[1::2] = W[0:-1:2], b[0:-1:2]  # every odd column repeats the one before it
    values, idx, _ = certified.certified_topk(x, W, b, k, signed, width=k + width)
    exact = x.double() @ W.double().T + b.double()
    score = exact.abs() if signed else exact
    kth = score.topk(k, dim=-1).values[:, -1:]
    tol = 1e-5 * (x.double().norm(dim=-1, keepdim=True) * W.double().norm(dim=-1).max() + b.abs().max())
    assert (idx.diff(dim=-1) > 0).all()  # k distinct columns per row, in increasing order (the canonical form)
    assert (score.gather(-1, idx) >= kth - tol).all()  # nothing below the k-th exact value was chosen
    torch.testing.assert_close(values.double(), exact.gather(-1, idx), rtol=1e-5, atol=float(tol.max()))


def test_certified_selection_falls_back_row_by_row():
    """Where a row's values lie closer together than the bf16 bounds (here: nearly equal columns), no
    certificate holds and the row is recomputed in fp32: the same answer as an fp32 top-k."""
    gen = torch.Generator().manual_seed(1)
    x, W = torch.randn(30, 16, generator=gen), torch.randn(200, 16, generator=gen)
    near = W[:1] + 1e-4 * W  # 200 columns within ≈ 1e-4 of each other
    b = torch.zeros(200)
    values, idx, redone = certified.certified_topk(x, near, b, 5)
    assert redone == 30
    ref = (x @ near.T).topk(5, dim=-1)
    assert torch.equal(idx.sort(-1).values, ref.indices.sort(-1).values)
    torch.testing.assert_close(values.sort(-1).values, ref.values.sort(-1).values)
    assert certified.certified_topk(x, W, b, 5)[2] < 30  # spread-out values: most rows certified


def test_certified_selections_with_weights_too_small_for_fp32_norms_recompute_every_row():
    """Weights ≈ 1e-24: their squares underflow in fp32, so no bound is claimed (every row recomputed, or the
    batch route declines); here the bf16 product alone would pick column 1, the exact top 1 is column 0."""
    n, f, s, big = 8, 64, 1e-24, 2.0**60
    x = torch.tensor([[big, -big]]).repeat(n, 1)
    W = torch.tensor([[0.0, s]]).repeat(f, 1)
    W[0] = torch.tensor([s * (1 + 0.99 * 2**-8), s * (1 - 2**-5)])
    W[1] = torch.tensor([0.5 * s, (0.5 - 17 * 2**-9) * s])
    b = torch.zeros(f)
    values, idx, redone = certified.certified_topk(x, W, b, 1)
    assert redone == n and (idx == 0).all()
    assert certified.certified_batch_topk(x, W, b, 1) is None


@pytest.mark.parametrize("method", ["topk", "batchtopk"])
def test_low_precision_dictionary_runs_on_cpu(method):
    """A bf16 dictionary's forward takes `embedding_bag` (MKL's CSR product has no bf16 kernel)."""
    sae = METHODS[method](16, 64, k=4, seed=0).to(torch.bfloat16)
    with torch.no_grad():
        assert sae(torch.randn(8, 16, dtype=torch.bfloat16)).x_hat.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["topk", "batchtopk"])
def test_trained_through_the_certified_selection_matches_the_plain_path(method, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gemm, "PROBE_MIN_WEIGHTS", 0)

    def chosen(choice, name, fp32, fast, *a):
        calls.append(name)
        return True

    def counted(fast):
        def run(*a):
            out = fast(*a)
            recomputed.append(None if out is None else out[-1])
            return out
        return run

    calls, recomputed = [], []
    monkeypatch.setattr(selection, "certified_chosen", chosen)
    monkeypatch.setattr(forward, "certified_chosen", chosen)
    monkeypatch.setattr(selection, "certified_topk", counted(certified.certified_topk))
    monkeypatch.setattr(forward, "certified_batch_topk", counted(certified.certified_batch_topk))
    fast_losses, fast_state = _train(method, tmp_path / "fast")
    assert len(calls) >= STEPS and len(recomputed) == len(calls)
    assert None not in recomputed and sum(recomputed) < 0.5 * B * len(recomputed)  # certified, most rows not recomputed
    with plain_kernels():
        plain_losses, plain_state = _train(method, tmp_path / "plain", precision="plain")
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-6)
    for name, value in plain_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-3, atol=1e-4, msg=f"{method}.{name}")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), f=st.sampled_from([96, 256, 512]), d=st.integers(1, 40), k=st.integers(1, 4),
       width=st.sampled_from([None, 1, 3]), scale=st.sampled_from([1e-3, 1.0, 30.0]), dup=st.booleans(),
       signed=st.booleans(), skew=st.booleans(), seed=st.integers(0, 999))
def test_certified_batch_topk_is_the_exact_batch_selection(n, f, d, k, width, scale, dup, signed, skew, seed):
    """The batch's B·k largest (by |·| when signed), those > 0 kept, against float64: duplicated columns
    (exact ties), rows far above the others (they own many picks), narrow widths (recomputed rows)."""
    gen = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(n, d, generator=gen) * scale, torch.randn(f, d, generator=gen), torch.randn(f, generator=gen) * 0.1
    if skew:
        x *= torch.exp(2 * torch.randn(n, 1, generator=gen))
    if dup:
        W[1::2], b[1::2] = W[0:-1:2], b[0:-1:2]
    found = certified.certified_batch_topk(x, W, b, k, signed, width=width)
    exact = x.double() @ W.double().T + b.double()
    score = exact.abs() if signed else exact
    total = min(n * k, n * f)
    cut = score.flatten().topk(total).values.min()
    tol = 1e-5 * (x.double().norm(dim=-1).max() * W.double().norm(dim=-1).max() + b.abs().max())
    if found is None:  # only where the cut is not clearly positive or a row keeps more than half the latents
        most = int(((score >= cut - tol) & (score > 0)).sum(-1).max())
        assert cut <= 10 * tol or most > f // 2 - 1
        return
    idx, keep, values, _ = found
    kept = torch.zeros(n, f, dtype=torch.bool).index_put_((torch.arange(n)[:, None].expand_as(idx)[keep], idx[keep]), torch.tensor(True))
    assert int(kept.sum()) == int(keep.sum()) <= total  # no column twice
    assert (torch.where(keep, idx, f).diff(dim=-1) >= 0).all() and (idx[~keep] == 0).all()  # in order, then padding
    assert (score[kept] > 0).all() and (score[kept] >= cut - tol).all()
    left = score[~kept]
    if left.numel() and int(kept.sum()):
        assert left.max() <= score[kept].min() + tol  # nothing left out above a pick
    if int(kept.sum()) < total:
        assert left.numel() == 0 or left.max() <= tol  # fewer picks only when the rest is ≤ 0
    torch.testing.assert_close(values[keep].double(), exact[torch.arange(n)[:, None].expand_as(idx)[keep], idx[keep]],
                               rtol=1e-5, atol=float(tol))
    assert (values[~keep] == 0).all()


def test_selection_choice_is_probed_once_and_kept_beside_the_gemm_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREKIT_CACHE", str(tmp_path))
    x, W, b = torch.randn(64, 576), torch.randn(2048, 576), torch.randn(2048)
    values, idx = selection.topk_preact(x, W, b, 8, choice=KernelChoice())
    ref = torch.addmm(b, x, W.T).topk(8, dim=-1)
    assert torch.equal(idx.sort(-1).values, ref.indices.sort(-1).values)
    known = json.loads((tmp_path / "gemm_choice.json").read_text())
    (key, answer), = ((k, v) for k, v in known.items() if "top-k selection k=8" in k)
    assert answer in ("fp32", "certified")
    if onednn_available():  # the fp32 candidate's own GEMM probe was recorded too, not overwritten
        assert any("torch.float32 | 2048x576" in k for k in known)
    other = "fp32" if answer == "certified" else "certified"
    (tmp_path / "gemm_choice.json").write_text(json.dumps({**known, key: other}))
    fresh = KernelChoice()  # a new run: reads the file, does not probe
    chosen = selection.certified_chosen(fresh, "top-k selection", selection.fp32_topk, certified.certified_topk, x, W, b, 8, False)
    assert chosen == (other == "certified")


def test_certified_topk_certifies_most_rows_and_its_answer_does_not_depend_on_the_width():
    """On spread-out values most rows pass the certificate; any width, keeping every group included, gives
    the same columns and the same values bit for bit (what a resumed run, whose width starts afresh, needs)."""
    gen = torch.Generator().manual_seed(7)
    x, W, b = torch.randn(256, 64, generator=gen), torch.randn(2048, 64, generator=gen), torch.randn(2048, generator=gen) * 0.1
    runs = [certified.certified_topk(x, W, b, 8, width=w) for w in (40, 60, 100, 2048)]
    assert runs[1][2] < 0.1 * 256 and runs[3][2] == 0  # all groups kept: nothing to certify, nothing recomputed
    for values, idx, _ in runs[1:]:
        assert torch.equal(idx, runs[0][1]) and torch.equal(values, runs[0][0])
    ref = (x.double() @ W.double().T + b.double()).topk(8, dim=-1).indices.sort(-1).values
    assert torch.equal(runs[0][1], ref)


def test_aux_columns_are_computed_without_a_kernel_probe(tmp_path, monkeypatch):
    """The dead-latent count changes every step: a probe per count would time both kernels and grow the cache."""
    monkeypatch.setenv("FEATUREKIT_CACHE", str(tmp_path))
    x, W, b = torch.randn(64, 576), torch.randn(4096, 576), torch.randn(4096)
    for dead in (1900, 1950, 2000):
        among = torch.zeros(4096, dtype=torch.bool)
        among[:dead] = True
        idx, values = selection.columns_topk(x, W, b, 5, among)
        full = x @ W.T + b
        torch.testing.assert_close(values, full.gather(-1, idx), rtol=1e-5, atol=1e-5)
        ref = full[:, :dead].topk(5, dim=-1).indices
        assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)
    assert not (tmp_path / "gemm_choice.json").exists()


def test_resume_through_the_certified_selection_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    """A resumed process starts the candidate width afresh; the weights still match bit for bit."""
    monkeypatch.setenv("FEATUREKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gemm, "PROBE_MIN_WEIGHTS", 0)
    monkeypatch.setattr(selection, "certified_chosen", lambda *a: True)
    monkeypatch.setattr(certified, "CERTIFIED_WIDTH", 1)  # narrow: many rows recomputed, the width grows during the run
    gen = torch.Generator().manual_seed(3)
    data = [sample(true_features(64, D, seed=5), B, gen) for _ in range(8)]
    recon = RECON_LOSSES["fvu"]

    def trainer(name):
        sae = METHODS["topk"](D, F, seed=0, k=K)  # a fresh process: its own kernel choice, widths afresh
        t = Trainer(sae, TrainConfig(batch_size=B, lr=3e-3, warmup_steps=2), tmp_path / name, len(data))
        return sae, t

    ref, t = trainer("ref")
    t.init_from_data(torch.cat(data[:2]))
    for x in data:
        t.train_step(x, recon)
    assert ref.kernel_choice.widths  # the width grew in the uninterrupted run
    first, t = trainer("run")
    t.init_from_data(torch.cat(data[:2]))
    for x in data[:4]:
        t.train_step(x, recon)
    t.save()
    resumed, t = trainer("run")
    t.resume()
    for x in data[4:]:
        t.train_step(x, recon)
    for name, value in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), f=st.sampled_from([8, 96, 256]), d=st.integers(1, 40), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       cuts=st.sampled_from(["quantile", "at_values", "negative", "zero"]), dup=st.booleans(), seed=st.integers(0, 999))
def test_certified_above_holds_every_entry_above_its_columns_cut(n, f, d, scale, cuts, dup, seed):
    """The bf16 route's candidate set contains every entry whose exact value (float64) or fp32 value exceeds
    its column's cut, for cuts of either sign, cuts equal to entries' own fp32 values, and duplicated columns;
    over the budget it declines."""
    gen = torch.Generator().manual_seed(seed)
    x, W, b = torch.randn(n, d, generator=gen) * scale, torch.randn(f, d, generator=gen), torch.randn(f, generator=gen) * 0.1
    if dup:
        W[1::2], b[1::2] = W[0:-1:2], b[0:-1:2]
    fp32 = torch.addmm(b, x, W.T)
    if cuts == "quantile":
        cut = fp32.quantile(0.9, dim=0) if n > 1 else fp32[0]
    elif cuts == "at_values":  # ties with the fp32 value of a row
        cut = fp32[torch.randint(0, n, (1,), generator=gen)].squeeze(0)
    elif cuts == "negative":
        cut = -fp32.abs().mean(0) - 0.01
    else:
        cut = torch.zeros(f)
    found = certified.certified_above(x, W, b, cut, n * f)
    exact = x.double() @ W.double().T + b.double()
    assert found is not None and found.shape == (n, f)
    assert not ((exact > cut.double()) & ~found).any() and not ((fp32 > cut) & ~found).any()
    wanted = int((fp32 > cut).sum())
    if wanted:
        assert certified.certified_above(x, W, b, cut, wanted - 1) is None


@pytest.mark.parametrize("case", ["sparse", "aux_zipf", "declined"])
def test_jumprelu_trained_through_certified_live_pairs_matches_the_plain_path(case, tmp_path, monkeypatch):
    """JumpReLU's sparse path with its live pairs found through the bf16 product (exact values at the pairs)
    trains like the plain dense formulas: alone, with the aux_zipf loss (its pre-activations come from
    `pre_at`, the output keeps no `pre`), and when the route declines every batch (the fp32 product decides)."""
    monkeypatch.setattr(jumprelu, "SPARSE_MAX_DENSITY", 1.0)
    monkeypatch.setattr(jumprelu, "CERTIFIED_MAX_DENSITY", 1e-9 if case == "declined" else 1.0)
    monkeypatch.setattr(jumprelu, "certified_chosen", lambda *a: True)
    found = []

    def counted(*a):
        live = certified.certified_above(*a)
        found.append(None if live is None else int(live.sum()))
        return live

    monkeypatch.setattr(jumprelu, "certified_above", counted)
    train = {"aux_zipf_coef": 0.5, "aux_zipf_tau": 1.0} if case == "aux_zipf" else {}
    fast_losses, fast_state = _train("jumprelu", tmp_path / "fast", **train)
    assert len(found) >= STEPS
    if case == "declined":
        assert set(found) == {None}
    else:
        assert None not in found and max(found) < 0.5 * B * F  # the bound leaves most pairs out
    with plain_kernels():
        plain_losses, plain_state = _train("jumprelu", tmp_path / "plain", precision="plain", **train)
    assert fast_losses[-1] < fast_losses[0]
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-6)
    for name, value in plain_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-3, atol=1e-4, msg=f"jumprelu.{name}")


def test_certified_above_survives_the_worst_case_rounding():
    """Operands whose bf16 roundings all err the same way: lo, hi = 1 + 2⁻⁸ ∓ 2⁻¹⁶ round to 1 and 1 + 2⁻⁷, so with
    x = [lo, hi, …] and W_j = [lo, −hi, …] the fp32 value is ≈ −0.0157 but the bf16 product ≈ −4.016. A cut just
    below the fp32 value must still find every entry (a bound 10 % tighter than the module's misses them all)."""
    lo, hi = 1 + 2**-8 - 2**-16, 1 + 2**-8 + 2**-16
    x = torch.tensor([lo, hi] * 256).repeat(6, 1)
    W = torch.tensor([lo, -hi] * 256).repeat(40, 1)
    b = torch.zeros(40)
    value = torch.addmm(b, x, W.T)
    assert float(value.max()) > -0.02 and float((x.bfloat16() @ W.bfloat16().T).float().max()) <= -3.9
    found = certified.certified_above(x, W, b, value[0] * (1 + 1e-3), x.shape[0] * 40)
    assert found is not None and bool(found.all())


def test_certified_above_in_many_blocks(monkeypatch):
    """A first block of 3 rows, then blocks of 7: the same superset, and the budget counted across blocks (a
    batch declines where its candidates so far pass 1.25 × the budget's share of the rows so far)."""
    monkeypatch.setattr(certified, "_ROWS", 7)
    monkeypatch.setattr(certified, "_FIRST_ROWS", 3)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        x, W, b = torch.randn(50, 24, generator=gen), torch.randn(96, 24, generator=gen), torch.randn(96, generator=gen) * 0.1
        fp32 = torch.addmm(b, x, W.T)
        cut = fp32.quantile(0.95, dim=0)
        found = certified.certified_above(x, W, b, cut, 50 * 96)
        assert found is not None and not ((fp32 > cut) & ~found).any()
        assert certified.certified_above(x, W, b, cut, int(found.sum()) - 1) is None
        total, ends = int(found.sum()), [3, *range(10, 50, 7), 50]
        early = any(int(found[:end].sum()) > 1.25 * total * end / 50 for end in ends)
        assert (certified.certified_above(x, W, b, cut, total) is None) == early


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 150), f=st.integers(1, 70), p=st.floats(0, 1), rows=st.integers(1, 9), seed=st.integers(0, 999))
def test_jumprelu_scan_of_the_live_pairs_equals_the_mask_form(n, f, p, rows, seed):
    """`_above` (blocks of rows, no (N, F) mask) gives `mask_to_sparse`'s form of pre > cut with the values of
    pre at the kept slots, and declines exactly when more pairs than the budget are live."""
    gen = torch.Generator().manual_seed(seed)
    pre, cut = torch.randn(n, f, generator=gen), torch.randn(f, generator=gen).abs() * (1 - p) * 3
    live = pre > cut
    old, jumprelu._SCAN_ROWS = jumprelu._SCAN_ROWS, rows
    try:
        found = jumprelu.live_above(pre, cut, n * f)
        idx, keep = mask_to_sparse(live)
        assert torch.equal(found[0], idx) and torch.equal(found[1], keep)
        assert torch.equal(found[2], torch.where(keep, pre.gather(-1, idx), 0))
        total = int(live.sum())
        assert jumprelu.live_above(pre, cut, total) is not None
        assert total == 0 or jumprelu.live_above(pre, cut, total - 1) is None
    finally:
        jumprelu._SCAN_ROWS = old


def test_jumprelu_scan_declines_a_dense_batch_early_but_not_an_even_one(monkeypatch):
    """Once `_SCAN_DECIDE_ROWS` rows are scanned, more than 1.5 × the budget's share so far declines (a dense
    batch costs a fraction of a scan); live pairs spread evenly up to the whole budget never decline early."""
    n, f = 64, 50
    monkeypatch.setattr(jumprelu, "_SCAN_ROWS", 4)
    monkeypatch.setattr(jumprelu, "_SCAN_DECIDE_ROWS", 16)
    cut = torch.zeros(f)
    even = -torch.ones(n, f)
    even[:, :5] = 1  # 5 live pairs in every row: 320 in all
    assert jumprelu.live_above(even, cut, 320) is not None
    front = -torch.ones(n, f)
    front[:16, :10] = 1  # 160 live pairs, all in the first 16 rows: 2 × the share of a budget of 320 there
    assert jumprelu.live_above(front, cut, 320) is None
    assert jumprelu.live_above(front, cut, 1000) is not None  # within 1.5 × the share of a larger budget
    calls = []
    real_nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda t, *a, **k: calls.append(1) or real_nonzero(t, *a, **k))
    assert jumprelu.live_above(front, cut, 320) is None and len(calls) == 4  # declined after 16 of the 64 rows


@settings(max_examples=40, deadline=None)
@given(f=st.integers(1, 50), shape=st.lists(st.integers(0, 12), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_gather_1d_equals_indexing_in_value_and_gradient(f, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(f, generator=gen, requires_grad=True)
    idx = torch.randint(0, f, shape, generator=gen)  # repeated indices: their gradients add up
    g = torch.randn(shape, generator=gen)
    fast = gather_1d(v, idx)
    (grad_fast,) = torch.autograd.grad((fast * g).sum(), v)
    plain = v[idx]
    (grad_plain,) = torch.autograd.grad((plain * g).sum(), v)
    assert torch.equal(fast, plain)
    torch.testing.assert_close(grad_fast, grad_plain, rtol=1e-5, atol=1e-6)
