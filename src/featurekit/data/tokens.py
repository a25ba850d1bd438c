"""Tokenising and packing documents into fixed-length contexts, and the token mask.

Packing convention (`pack`):
    stream = doc_0 ⧺ [sep] ⧺ doc_1 ⧺ [sep] ⧺ doc_2 ...      (each doc tokenised without special tokens)
    sep    = the tokenizer's eos token, else its bos token, else its sep token
    rows   = consecutive, non-overlapping slices of the stream; the incomplete tail is dropped.
With `prepend_bos`, each row is [bos] ⧺ (context_len - 1) stream tokens, so every context starts
the way the model saw its training contexts start. `prepend_bos=None` follows the tokenizer: BOS is
prepended iff `tokenizer(text)` (with special tokens) puts one in front (Llama/Gemma: yes; GPT-2 and
the SmolLM2 GGUF tokenizer: no). Documents are tokenised lazily, a few at a time, so a small
`max_contexts` reads only the first documents.

Mask convention (`token_mask`): True where a token's activation is kept for training/evaluation
sets. Position 0 is excluded by default (its residual stream is an outlier "attention sink" with a
huge norm), and so is every special token (bos/eos/pad/... = `tokenizer.all_special_ids`).

One context per document (`document_contexts`): for comparisons that name a token by the document and
the character where it ends (e.g. across two tokenizers), each document's first tokens, right-padded,
with the character end offset of every token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from featurekit.errors import FeaturekitError

# Documents are tokenised in chunks (batching is faster than one by one) of at most this many
# documents or characters, so that a small `max_contexts` tokenises little more than it needs.
_DOCS_PER_CALL = 32
_CHARS_PER_CALL = 100_000


def pack(texts: Iterable[str], tokenizer, context_len: int, max_contexts: int | None = None, *,
         prepend_bos: bool | None = None) -> torch.Tensor:
    """Pack `texts` into a LongTensor (N, context_len); see the module docstring for the layout.

    N = number of complete rows the text fills, capped at `max_contexts`. Raises FeaturekitError if
    the text does not fill a single row.
    """
    if context_len < 1 or (max_contexts is not None and max_contexts < 1):
        raise FeaturekitError(f"context_len ({context_len}) and max_contexts ({max_contexts}) must be >= 1")
    if prepend_bos is None:
        prepend_bos = adds_bos(tokenizer)
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise FeaturekitError("prepend_bos=True but the tokenizer has no bos token: pass prepend_bos=False")
    body = context_len - 1 if prepend_bos else context_len
    if body < 1:
        raise FeaturekitError(f"context_len={context_len} leaves no room after the BOS token: use context_len >= 2")
    sep = separator_id(tokenizer)

    rows: list[list[int]] = []
    buf: list[int] = []
    start = 0  # buf[start:] is the part of the stream not yet cut into rows
    n_docs = 0
    for ids in _token_stream(texts, tokenizer):
        if n_docs:
            buf.append(sep)
        buf.extend(ids)
        n_docs += 1
        while len(buf) - start >= body and (max_contexts is None or len(rows) < max_contexts):
            row = buf[start:start + body]
            rows.append([bos, *row] if prepend_bos else row)
            start += body
        if max_contexts is not None and len(rows) >= max_contexts:
            break
        if start > 1 << 16:  # keep the buffer small on long streams
            del buf[:start]
            start = 0
    if not rows:
        got = len(buf) if n_docs else 0
        raise FeaturekitError(
            f"the text fills no context of {context_len} tokens ({n_docs} documents, {got} tokens): "
            "give more text (another source or split) or a smaller context_len")
    return torch.tensor(rows, dtype=torch.long)


def token_mask(input_ids: torch.Tensor, tokenizer, exclude_first: bool = True,
               exclude_special: bool = True) -> torch.Tensor:
    """BoolTensor like `input_ids` (N, T): True where the token is kept (see the module docstring)."""
    if input_ids.ndim != 2:
        raise FeaturekitError(f"input_ids must be (N, T), got shape {tuple(input_ids.shape)}: use tokens.pack")
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    if exclude_first and input_ids.shape[1] > 0:
        mask[:, 0] = False
    if exclude_special:
        special = sorted({i for i in tokenizer.all_special_ids if i is not None})
        if special:
            mask &= ~torch.isin(input_ids, torch.tensor(special, dtype=input_ids.dtype, device=input_ids.device))
    return mask


def tokenize(tokenizer, texts: str | list[str], policy: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as a run sees them, for Python users: `(input_ids, keep)`, one row per text, right-padded.

    BOS goes in front where the tokenizer adds one (as `pack` does). `keep` (bool, like input_ids) marks
    the tokens a run trains and evaluates on under `policy` (a dictionary file's `special_tokens`, e.g.
    `sae.metadata["special_tokens"]`; default: position 0 and special tokens excluded). Padding is
    never kept. A run also drops attention-sink tokens by norm once the activations exist:
    `keep & ~featurekit.data.harvest.norm_outliers(acts, keep, policy["max_norm_multiple"])`.
    Right padding leaves a causal model's activations at the real tokens unchanged."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise FeaturekitError("tokenize() needs at least one text")
    policy = policy or {}
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    rows = [prefix + ids for ids in _encode(texts, tokenizer)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator_id(tokenizer)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    real = torch.tensor([[i < len(r) for i in range(width)] for r in rows])
    keep = token_mask(ids, tokenizer, exclude_first=policy.get("exclude_first", True),
                      exclude_special=policy.get("exclude_special", True))
    return ids, keep & real


def document_contexts(texts: Sequence[str], tokenizer, context_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One context per document: `(input_ids, present, char_ends)`, each (len(texts), context_len).

    Row i holds the first tokens of texts[i] (BOS in front where the tokenizer adds one, as `pack`), cut at
    `context_len` and right-padded (pad token, else the separator). `present` is True at the document's
    tokens (not at BOS or padding); `char_ends[i, t]` is the character offset in texts[i] where token t
    ends (-1 at BOS and padding). Needs a fast tokenizer (character offsets). Mask as for `pack`:
    `present & token_mask(input_ids, tokenizer)`."""
    if isinstance(texts, str):
        raise FeaturekitError("document_contexts() takes a list of documents, not one string: wrap it as [text]")
    texts = list(texts)
    if not texts:
        raise FeaturekitError("document_contexts() needs at least one document")
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    if context_len <= len(prefix):
        raise FeaturekitError(f"context_len={context_len} leaves no room for the document's tokens: use context_len >= {len(prefix) + 1}")
    if getattr(tokenizer, "is_fast", True) is False:
        raise FeaturekitError("document_contexts() needs a fast tokenizer (character offsets): "
                              "load the model's tokenizer with use_fast=True")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=context_len - len(prefix), verbose=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator_id(tokenizer)
    ids = torch.full((len(texts), context_len), pad, dtype=torch.long)
    ends = torch.full((len(texts), context_len), -1, dtype=torch.long)
    for i, (row, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        ids[i, :len(prefix) + len(row)] = torch.tensor(prefix + row, dtype=torch.long)
        ends[i, len(prefix):len(prefix) + len(row)] = torch.tensor([end for _, end in offsets], dtype=torch.long)
    return ids, ends >= 0, ends


def adds_bos(tokenizer) -> bool:
    """True if the tokenizer puts its bos token in front of a text when special tokens are on."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def separator_id(tokenizer) -> int:
    """The token placed between packed documents: eos, else bos, else sep."""
    for name in ("eos_token_id", "bos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise FeaturekitError("the tokenizer has no eos, bos or sep token to separate documents: "
                          "set one (tokenizer.eos_token = ...) before packing")


def _token_stream(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, tokenised a few documents per call."""
    if isinstance(texts, str):
        raise FeaturekitError("pack() takes a list of documents, not one string: wrap it as [text]")
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) == _DOCS_PER_CALL or chars >= _CHARS_PER_CALL:
            yield from _encode(chunk, tokenizer)
            chunk, chars = [], 0
    if chunk:
        yield from _encode(chunk, tokenizer)


def _encode(chunk: list[str], tokenizer) -> list[list[int]]:
    # verbose=False: no "sequence longer than model_max_length" warning; we cut rows ourselves.
    return tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
