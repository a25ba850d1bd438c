"""Token streams for the LM: a text file read character by character, or a safetensors file of token ids.

* a text file (``.txt``, ``.pgn``, anything not ``.safetensors``): every distinct character is a token,
  ids in sorted character order; the vocabulary (the list of characters) goes with the run. One more id,
  ``len(vocab)``, is reserved for padding (``PAD``; never in the data), so the vocabulary size is
  ``len(vocab) + 1`` and a tokenizer can pad and mark unknown characters without reusing a real one.
* a ``.safetensors`` file holding ``tokens`` (1-D integer ids) and ``vocab_size`` (a 0-d or 1-element
  integer tensor): ids from any tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import FeaturekitError


def char_tokens(text: str) -> tuple[torch.Tensor, list[str]]:
    """(ids, vocabulary) of ``text`` read as characters."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), vocab


def read_stream(path: str | Path) -> tuple[torch.Tensor, int, list[str] | None]:
    """(token ids, vocab size, vocabulary or None) of the file at ``path`` (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FeaturekitError(f"no data file {path}: give a text file (read as characters) or a .safetensors file with "
                              f"'tokens' and 'vocab_size'")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise FeaturekitError(f"{path} is not a readable safetensors file ({err})") from err
        if "tokens" not in tensors or "vocab_size" not in tensors or tensors["vocab_size"].numel() != 1:
            raise FeaturekitError(f"{path} must hold a 1-D 'tokens' tensor and a one-element 'vocab_size' tensor; "
                                  f"it holds {sorted(tensors)}")
        tokens = tensors["tokens"]
        if tokens.ndim != 1 or tokens.is_floating_point():
            raise FeaturekitError(f"'tokens' in {path} must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        return tokens.long(), int(tensors["vocab_size"].item()), None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FeaturekitError(f"{path} is not UTF-8 text; a token-id file must end in .safetensors") from err
    if not text:
        raise FeaturekitError(f"{path} is empty")
    tokens, vocab = char_tokens(text)
    return tokens, len(vocab) + 1, vocab
