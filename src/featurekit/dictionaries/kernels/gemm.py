"""The encoder product x Wᵀ + b without grad: the one (N × F × d) product a training step cannot avoid.

On CPU it runs through MKL (the bias riding in the product, `mm_bias`) or oneDNN (`onednn_linear`),
whichever the dictionary's `KernelChoice` finds faster for the shape: the winner depends on the CPU
(BENCHMARKS.md, "Numbers formerly in code comments"). Under a bf16 autocast the product runs in bf16 and
the selection with it; `sparse.gather_linear` then recomputes the selected values exactly in fp32 over the
N·k pairs, so only ties near the k-th value can differ from an fp32 selection.
"""

from __future__ import annotations

import functools

import torch

from . import reference
from .machine import KernelChoice, cpu_name, fastest
from .reference import plain_active


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build runs oneDNN's linear correctly (a fact about the build, cached for the process)."""
    try:
        x, w = torch.randn(4, 8), torch.randn(3, 8)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.backends.mkldnn.is_available()) and torch.allclose(out, x @ w.T, atol=1e-5)
    except (RuntimeError, AttributeError):
        return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def onednn_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """oneDNN's linear with the bias fused, in `dtype`."""
    x, W, b = x.to(dtype).contiguous(), W.to(dtype), b.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(W, x.shape[0]), b, "none", [], "")


def mm_bias(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[x, 1] [W, b]ᵀ in `dtype`: the bias rides in the product (addmm would first copy b into every
    row of the (N, F) output, a whole extra pass); the casts happen in the copies into the augmented operands."""
    n, d = x.shape
    xa = torch.empty(n, d + 1, dtype=dtype, device=x.device)
    xa[:, :d] = x
    xa[:, d] = 1
    Wa = torch.empty(W.shape[0], d + 1, dtype=dtype, device=W.device)
    Wa[:, :d] = W
    Wa[:, d] = b
    return torch.mm(xa, Wa.T)


GEMM_CHOICES = {"mm_bias": mm_bias, "onednn": onednn_linear}
#: smaller encoders take `mm_bias` without a probe (a step is then too short for the kernel to matter)
PROBE_MIN_WEIGHTS = 1 << 20


def cpu_gemm(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, choice: KernelChoice):
    """The faster of `mm_bias` and oneDNN's linear for this CPU, torch, dtype, shape and thread count, as
    `choice` answers it (timed once per machine, then read from the cache folder: module docstring)."""
    if W.numel() < PROBE_MIN_WEIGHTS or not onednn_available():
        choice.note("encoder GEMM", "mm_bias")
        return mm_bias
    key = f"{cpu_name()} | torch {torch.__version__} | {dtype} | {W.shape[0]}x{W.shape[1]} | threads {torch.get_num_threads()}"
    name = choice.answer(key, GEMM_CHOICES, lambda: fastest(GEMM_CHOICES, x[:1024], W, b, dtype))
    choice.note("encoder GEMM", name)
    return GEMM_CHOICES[name]


@torch.no_grad()
def encoder_preact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, choice: KernelChoice | None = None) -> torch.Tensor:
    """x Wᵀ + b (N, F), no grad; on CPU through the kernel `choice` takes for the shape (`cpu_gemm`), or MKL
    without a question where `choice` is None (shapes that change every step, callers outside a dictionary);
    bf16 under a bf16 autocast (then the result is bf16)."""
    low = autocast_dtype(x.device)
    with torch.autocast(x.device.type, enabled=False):
        if plain_active():
            return reference.encoder_preact(x, W, b)
        dtype = low or x.dtype
        if x.dim() == 2 and x.device.type == "cpu":
            return (cpu_gemm(x, W, b, dtype, choice) if choice is not None else mm_bias)(x, W, b, dtype)
        return reference.encoder_preact(x.to(dtype), W.to(dtype), b.to(dtype))
