"""The first-letter task of the absorption evaluation: single-token words from the tokenizer's vocabulary, in
SAEBench's in-context prompt, and the site's activation at each word's token.

SAEBench's prompt for a word w is ten "{example} has the first letter: {E}" lines of other words, then
"{w} has the first letter:", and reads the activation at w's token (position −6). The activation at w's token
depends only on what comes before it, so here the prompts are *packed*: one sequence holds many lines
"\\n{w_1} has the first letter: {W_1}\\n{w_2} has the first letter: {W_2}…" and every word after the first
`n_icl` is read at its own token, whose context is then ≥ n_icl complete example lines of the same split's
words (up to n_icl + words_per_sequence − 1). One sequence serves `words_per_sequence` words instead of one,
which makes the task affordable on a CPU; the word's own answer comes after its token and cannot leak into it.
The sequence is built from token ids, so every word is exactly one token, as SAEBench requires.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..errors import FeaturekitError
from ..models.hooks import capture_activations

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE_SUFFIX = " has the first letter:"  #: SAEBench's template "{word} has the first letter:" after the word


def alpha_tokens(tokenizer) -> list[tuple[int, str]]:
    """(token id, text) of every non-special token that decodes to ASCII letters only, with at most one leading
    space (SAEBench's `get_alpha_tokens`), by id."""
    special = {i for i in tokenizer.all_special_ids if i is not None}
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    out = []
    for i, text in zip(ids, texts):
        word = text[1:] if text.startswith(" ") else text
        if word and word.isascii() and word.isalpha():
            out.append((i, text))
    return out


def first_letter(text: str) -> int:
    return LETTERS.index(text.strip()[0].lower())


def split_words(words: Sequence[tuple[int, str]], n_words: int | None, train_fraction: float, seed: int
                ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """A seeded shuffle of the words, cut to `n_words` (None: all), split into training and held-out words."""
    words = list(words)
    random.Random(seed).shuffle(words)
    if n_words is not None:
        words = words[:n_words]
    cut = int(round(train_fraction * len(words)))
    if cut < 1 or cut >= len(words):
        raise FeaturekitError(f"{len(words)} words cannot be split into training and held-out words: use more words "
                              f"(eval.absorption_words)")
    return words[:cut], words[cut:]


def packed_prompts(tokenizer, words: Sequence[tuple[int, str]], n_icl: int, words_per_sequence: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(ids (S, T), positions (S, W) of the read words' tokens, -1 where a shorter sequence has none, order): the
    packed sequences of the module docstring; `order[i]` is the index into `words` of the i-th read word (row-major
    over positions ≥ 0). Each sequence starts with n_icl example lines drawn from the other words."""
    if len(words) <= n_icl:
        raise FeaturekitError(f"{len(words)} words are too few for {n_icl} in-context examples: lower eval.absorption_icl")
    sep = tokenizer.encode("\n", add_special_tokens=False)
    suffix = tokenizer.encode(TEMPLATE_SUFFIX, add_special_tokens=False)
    answers = [tokenizer.encode(" " + letter.upper(), add_special_tokens=False) for letter in LETTERS]
    rng = random.Random(seed)
    rows, positions, order = [], [], []
    for start in range(0, len(words), words_per_sequence):
        chunk = list(range(start, min(start + words_per_sequence, len(words))))
        examples = _sample_outside(rng, len(words), chunk, n_icl)
        ids, read = list(sep), []
        for j, i in enumerate(examples + chunk):
            token, text = words[i]
            if j >= n_icl:
                read.append(len(ids))
                order.append(i)
            ids += [token] + suffix + answers[first_letter(text)] + sep
        rows.append(ids)
        positions.append(read)
    width, n_read = max(map(len, rows)), max(map(len, positions))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    pos = torch.full((len(rows), n_read), -1, dtype=torch.long)
    for r, (row, read) in enumerate(zip(rows, positions)):
        ids[r, :len(row)] = torch.tensor(row)
        pos[r, :len(read)] = torch.tensor(read)
    return ids, pos, order


def _sample_outside(rng: random.Random, n: int, chunk: list[int], k: int) -> list[int]:
    """k distinct indices below n outside `chunk` (a seeded draw)."""
    if n - len(chunk) < k:
        raise FeaturekitError(f"{n} words leave {n - len(chunk)} outside a sequence, too few for {k} in-context examples: "
                              f"lower eval.absorption_icl or eval.absorption_words_per_sequence")
    inside, out = set(chunk), []
    while len(out) < k:
        i = rng.randrange(n)
        if i not in inside and i not in out:
            out.append(i)
    return out


@torch.no_grad()
def word_activations(model, tokenizer, site: str, words: Sequence[tuple[int, str]], n_icl: int, words_per_sequence: int,
                     seed: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations (n, d) float32, first-letter labels (n,)) of the words, in the order of `words`."""
    acts, labels = word_activations_at(model, tokenizer, [site], words, n_icl, words_per_sequence, seed, batch_size)
    return acts[site], labels


def word_activations_at(model, tokenizer, sites: Sequence[str], words: Sequence[tuple[int, str]], n_icl: int,
                        words_per_sequence: int, seed: int, batch_size: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`word_activations` at several sites of the same forward passes: ({site: (n, d_site)}, labels)."""
    ids, pos, order = packed_prompts(tokenizer, words, n_icl, words_per_sequence, seed)
    lengths = pos.max(1).values + 1  # through the last read word's token
    rows: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    for start in range(0, len(ids), batch_size):
        batch, read = ids[start:start + batch_size], pos[start:start + batch_size]
        width = int(lengths[start:start + batch_size].max())  # tokens after the last read word's line are not needed
        # right padding needs no attention mask: a causal model's positions before the padding never see it
        seen = capture_activations(model, batch[:, :width], list(sites))
        r, c = (read >= 0).nonzero(as_tuple=True)
        for site in sites:
            rows[site].append(seen[site].float().cpu()[r, read[r, c]])
    out = {}
    for site in sites:
        x = torch.empty(len(words), rows[site][0].shape[1])
        x[torch.tensor(order)] = torch.cat(rows[site])
        out[site] = x
    labels = torch.tensor([first_letter(text) for _, text in words])
    return out, labels
