"""The encoder product and the per-machine kernel choices behind it.

* `encoder_preact(x, W, b)` = x Wᵀ + b without grad, the one (N × F × d) product a training step cannot
  avoid: on CPU through MKL (the bias riding in the product) or oneDNN, whichever a one-time probe finds
  faster for the shape (the winner depends on the CPU: BENCHMARKS.md); in bf16 under a bf16 autocast
  (selection in bf16; `sparse.gather_linear` then recomputes the selected values exactly in fp32 with one
  sampled dense-dense product over the N·k pairs, so only ties near the k-th value can differ).
* `fastest(choices, *args)` times candidate kernels in turns; `cached_choice(key, ...)` keeps a machine's
  answer in the cache folder (`gemm_choice.json`), so later runs take the same kernel and a run repeated
  from its config reproduces its weights bit for bit. `selection.py` uses both for its own choice.
* `plain_kernels()` switches every fast path (here, `sparse.py`, `selection.py`, `certified.py`'s callers)
  to the straightforward dense autograd formulas, which the tests train against.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .._io import atomic_write_json, cache_dir

_state = {"plain": False, "onednn": None, "gemm": {}}


@contextmanager
def plain_kernels() -> Iterator[None]:
    """Inside, the kernels run the straightforward dense autograd formulas (the reference the fast
    paths are tested against): MKL/addmm encoder, dense gather backward."""
    before = _state["plain"]
    _state["plain"] = True
    try:
        yield
    finally:
        _state["plain"] = before


def plain_active() -> bool:
    """True inside `plain_kernels()`."""
    return _state["plain"]


def _onednn_available() -> bool:
    if _state["onednn"] is None:
        try:
            x, w = torch.randn(4, 8), torch.randn(3, 8)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 4)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _state["onednn"] = bool(torch.backends.mkldnn.is_available()) and torch.allclose(out, x @ w.T, atol=1e-5)
        except (RuntimeError, AttributeError):
            _state["onednn"] = False
    return _state["onednn"]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _onednn_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """oneDNN's linear with the bias fused, in `dtype`."""
    x, W, b = x.to(dtype).contiguous(), W.to(dtype), b.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(W, x.shape[0]), b, "none", [], "")


def _mm_bias(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


def fastest(choices: dict, *args, rounds: int = 3) -> str:
    """The name of the fastest function in `choices` on `args`: best of `rounds` timings each, taken in
    turns so that a slow spell of the machine hits every candidate alike (a single timing each picked the
    slower kernel about one time in three on a 2-vCPU VM, whose speed drifts)."""
    best = dict.fromkeys(choices, float("inf"))
    for fn in choices.values():
        fn(*args)  # warm-up (first-call packing, allocation)
    for _ in range(rounds):
        for name, fn in choices.items():
            start = time.perf_counter()
            fn(*args)
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


GEMM_CHOICES = {"mm_bias": _mm_bias, "onednn": _onednn_linear}
#: smaller encoders take `_mm_bias` without a probe (a step is then too short for the kernel to matter)
PROBE_MIN_WEIGHTS = 1 << 20


def _cpu_gemm(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """The faster of the augmented MKL product (`_mm_bias`) and oneDNN's linear for this CPU, torch,
    dtype, shape and thread count: which one wins depends on the CPU (oneDNN ≈ 2× MKL in fp32 on an
    AVX-512 AMD Zen 5; MKL ahead on an AMX Xeon; BENCHMARKS.md). Chosen once by timing both, and the
    choice is kept in the cache folder (`gemm_choice.json`) so that later runs on the machine take the
    same kernel, and a run repeated from its config reproduces its weights bit for bit."""
    if W.numel() < PROBE_MIN_WEIGHTS or not _onednn_available():
        return _mm_bias
    key = f"{cpu_name()} | torch {torch.__version__} | {dtype} | {W.shape[0]}x{W.shape[1]} | threads {torch.get_num_threads()}"
    return GEMM_CHOICES[cached_choice(key, GEMM_CHOICES, lambda: fastest(GEMM_CHOICES, x[:1024], W, b, dtype))]


def cached_choice(key: str, allowed, probe) -> str:
    """The machine's answer to `key` from cache_dir()/gemm_choice.json, or `probe()`'s, then recorded there
    (the file is read again just before writing: a probe may itself have recorded another answer)."""
    if key not in _state["gemm"]:
        path = cache_dir() / "gemm_choice.json"

        def known() -> dict:
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return {}

        answer = known().get(key)
        if answer not in allowed:
            answer = probe()
            try:
                atomic_write_json(path, {**known(), key: answer})
            except OSError:  # a read-only cache: probe again next time
                pass
        _state["gemm"][key] = answer
    return _state["gemm"][key]


@torch.no_grad()
def encoder_preact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, probe: bool = True) -> torch.Tensor:
    """x Wᵀ + b (N, F), no grad; on CPU through the faster of MKL and oneDNN (`_cpu_gemm`; `probe=False`:
    MKL without a probe, for shapes that change every step), bf16 under a bf16 autocast (then the result
    is bf16)."""
    low = autocast_dtype(x.device)
    with torch.autocast(x.device.type, enabled=False):
        if _state["plain"]:
            return torch.addmm(b, x, W.T) if x.dim() == 2 else x @ W.T + b
        dtype = low or x.dtype
        if x.dim() == 2 and x.device.type == "cpu":
            return (_cpu_gemm(x, W, b, dtype) if probe else _mm_bias)(x, W, b, dtype)
        x, W, b = x.to(dtype), W.to(dtype), b.to(dtype)
        return torch.addmm(b, x, W.T) if x.dim() == 2 else x @ W.T + b
