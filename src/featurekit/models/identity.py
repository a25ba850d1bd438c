"""Identity digests: a model's weights and a tokenizer, as sha256 hex strings, for the activation cache.

``model_digest(model)`` hashes every parameter and buffer: its name, dtype, shape and raw bytes, in
name order (tied weights once). The bytes are read through a uint8 view of the tensor (no float
conversion, no copy for a contiguous CPU tensor; bf16 works although numpy has no bf16), cut into
fixed 16 MiB chunks whose sha256s are computed in a thread pool (hashlib releases the GIL) and
combined in order, so the digest does not depend on the thread count (its cost for the embedded model:
BENCHMARKS.md, "Run identity digests").

``tokenizer_digest(tokenizer)`` hashes what decides the token ids: a fast tokenizer's serialised
pipeline (``backend_tokenizer.to_str()`` without its padding/truncation state, which every call with
``padding=``/``truncation=`` rewrites), its special tokens, padding side and class name; a slow one's
sorted vocabulary instead of the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from featurekit.errors import FeaturekitError
from featurekit.models.sites import unwrap

CHUNK_BYTES = 16 << 20  # part of the digest's definition: changing it changes every digest


def _chunks(name: str, tensor: torch.Tensor) -> list[memoryview]:
    if tensor.is_meta:
        raise FeaturekitError(f"cannot digest the model: {name!r} is on the meta device (no weights loaded); "
                              "load the model's weights first.")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    return [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [data]


def model_digest(model: Any, threads: int | None = None) -> str:
    """sha256 (hex) of a model's parameters and buffers: names, dtypes, shapes and bytes, in name order.

    ``model``: an HF module or a LoadedModel. ``threads``: hashing threads (default: the CPU count,
    at most 8); the digest is the same for any count."""
    module = unwrap(model)
    named = dict(module.named_parameters())
    named.update((n, b) for n, b in module.named_buffers() if n not in named)
    items = sorted(named.items())
    pieces = [_chunks(name, t) for name, t in items]
    flat = [chunk for chunk_list in pieces for chunk in chunk_list]
    workers = threads or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = iter(list(pool.map(lambda c: hashlib.sha256(c).digest(), flat)))
    top = hashlib.sha256(b"featurekit.model_digest.v1\n")
    for (name, t), chunk_list in zip(items, pieces):
        top.update(f"{name}\t{str(t.dtype).removeprefix('torch.')}\t{tuple(t.shape)}\n".encode())
        for _ in chunk_list:
            top.update(next(digests))
    return top.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 (hex) of what decides a tokenizer's ids: pipeline (fast) or vocabulary (slow), special
    tokens, padding side and class name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.padding is not None or backend.truncation is not None:  # left by an earlier call
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer stays as it is
            backend.no_padding()
            backend.no_truncation()
        pipeline = backend.to_str()
    else:
        pipeline = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    record = {
        "class": type(tokenizer).__name__,
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "padding_side": getattr(tokenizer, "padding_side", None),
    }
    top = hashlib.sha256(b"featurekit.tokenizer_digest.v1\n")
    top.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    top.update(pipeline.encode())
    return top.hexdigest()
