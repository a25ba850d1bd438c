"""Property tests for the sparsity operators."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.dictionaries.operators import relu, topk, topk_indices


@st.composite
def pre_and_k(draw):
    rows = draw(st.integers(1, 6))
    width = draw(st.integers(1, 40))
    k = draw(st.integers(1, width + 3))
    seed = draw(st.integers(0, 2**31 - 1))
    pre = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.1, 100))
    return pre, k


@settings(max_examples=150, deadline=None)
@given(pre_and_k())
def test_topk_keeps_exactly_the_positive_among_the_k_largest(case):
    pre, k = case
    codes = topk(pre, k)
    kk = min(k, pre.shape[-1])
    kth = pre.topk(kk, dim=-1).values[:, -1:]
    expected_count = ((pre >= kth) & (pre > 0)).sum(-1)  # continuous values: no ties
    assert torch.equal((codes != 0).sum(-1), expected_count)
    assert ((codes != 0).sum(-1) <= kk).all()
    nz = codes != 0
    assert torch.equal(codes[nz], pre[nz])  # selected values pass unchanged
    assert (codes >= 0).all()
    # every kept value is at least as large as every dropped positive value
    dropped = (~nz) & (pre > 0)
    for r in range(pre.shape[0]):
        if nz[r].any() and dropped[r].any():
            assert codes[r][nz[r]].min() >= pre[r][dropped[r]].max()


@settings(max_examples=100, deadline=None)
@given(pre_and_k())
def test_topk_indices_is_the_sparse_form_of_topk(case):
    pre, k = case
    values, indices = topk_indices(pre, k)
    dense = torch.zeros_like(pre).scatter(-1, indices, values)
    assert torch.equal(dense, topk(pre, k))


@settings(max_examples=100, deadline=None)
@given(pre_and_k())
def test_topk_is_scale_equivariant(case):
    pre, k = case
    assert torch.allclose(topk(pre * 3.0, k), 3.0 * topk(pre, k))


def test_topk_gradient_flows_only_through_selected():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5]], requires_grad=True)
    topk(pre, 2).sum().backward()
    assert pre.grad.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_relu_and_bad_k():
    assert relu(torch.tensor([-1.0, 0.0, 2.0])).tolist() == [0.0, 0.0, 2.0]
    try:
        topk(torch.zeros(2, 3), 0)
    except ValueError as err:
        assert "k must be positive" in str(err)
    else:
        raise AssertionError("k=0 must raise")
