"""The speed corner: how a training step avoids the (N, F) matrices of the plain formulas.

A method file says what is computed (pre-activation → selection rule → decode → losses); this package
computes it fast, with the same values and gradients as the plain dense formulas of `reference.py` up to
fp32 summation order. What the methods and the trainer use:

* `Encoder`, `Picked`, `FastCodes` and the shared sparse forward (`forward.py`): a selection (`topk`,
  `batch_topk`, `from_mask`, or a `Picked` built by the method) → `sparse_forward` (codes at the picked
  pairs, sparse decode) → the `FastCodes` a dictionary's `Output` reads.
* `jumprelu_forward`, `JumpReLUFn`, `StepFn`: JumpReLU's straight-through estimators and their fast paths.
* `encoder_preact`, `row_topk`, `batch_topk_sparse`, `masked_topk`, `sparse_decode`, `gather_1d`, `densify`,
  `count_true`: single kernels some methods and operators call directly.
* `KernelChoice` (one per dictionary: its per-machine kernel choices) and `kernel_choices(dictionary)`, the
  choices as JSON for the dictionary's provenance.
* `plain_kernels()` / `plain_active()`: run every kernel as its plain dense formula (the tests' reference).

Inside: `gemm.py` (the encoder product), `selection.py` (exact top-k selections), `certified.py` (the same
selections through a bf16 product, certified exact), `sparse.py` (sparse autograd kernels), `jumprelu.py`,
`machine.py` (the per-machine choices).
"""

from .forward import Encoder, FastCodes, Picked, batch_topk, from_mask, sparse_codes, sparse_forward, topk
from .gemm import encoder_preact
from .jumprelu import JumpReLUFn, StepFn, jumprelu_forward
from .machine import KernelChoice, kernel_choices
from .reference import plain_active, plain_kernels
from .selection import batch_topk_sparse, masked_topk, row_topk
from .sparse import count_true, densify, gather_1d, sparse_decode

__all__ = [
    "Encoder", "FastCodes", "JumpReLUFn", "KernelChoice", "Picked", "StepFn", "batch_topk", "batch_topk_sparse", "count_true",
    "densify", "encoder_preact", "from_mask", "gather_1d", "jumprelu_forward", "kernel_choices", "masked_topk", "plain_active",
    "plain_kernels", "row_topk", "sparse_codes", "sparse_decode", "sparse_forward", "topk",
]
