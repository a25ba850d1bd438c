"""Feature absorption: the per-token rule on hand-built cases, and the whole first-letter evaluation on a synthetic
hierarchy where the answer is known (a letter feature absorbed into word latents by construction, or not)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.errors import FeaturekitError
from featurekit.evaluate.absorption import (
    AbsorptionSettings,
    absorption_fractions,
    balanced_weights,
    f1_score,
    first_letter_absorption,
    split_latents,
)


def case(probe_proj, latent_proj, cos, main, codes=None):
    latent_proj = torch.tensor([latent_proj], dtype=torch.float64)
    codes = latent_proj.clone() if codes is None else torch.tensor([codes], dtype=torch.float64)
    fraction, full = absorption_fractions(torch.tensor([probe_proj]), latent_proj, codes, torch.tensor(cos), main)
    return round(float(fraction[0]), 6), bool(full[0])


def test_absorption_fraction_and_full_absorption_on_hand_built_tokens():
    cos = [0.9, 0.5, 0.05, 0.3]
    # the main latent carries the whole probe projection: no absorption
    assert case(1.0, [1.0, 0.0, 0.0, 0.0], cos, [0]) == (0.0, False)
    # main silent, latent 1 (cos 0.5) carries 0.8 of 1.0: fully absorbed
    assert case(1.0, [0.0, 0.8, 0.0, 0.0], cos, [0]) == (1.0, True)
    # main carries 0.25, absorbers 0.5 + 0.25: a = min(0.75, 1 - 0.25) = 0.75, fraction 0.75 / (0.75 + 0.25)
    assert case(1.0, [0.25, 0.5, 0.0, 0.25], cos, [0]) == (0.75, False)
    # main carries 0.5, absorbers 0.4 (share 0.4 is enough): a = min(0.4, 0.5) → 0.4 / 0.9
    assert case(1.0, [0.5, 0.4, 0.0, 0.0], cos, [0]) == (round(0.4 / 0.9, 6), False)
    # the only other latent is not aligned with the probe (cos 0.05 < 0.1): nothing absorbs
    assert case(1.0, [0.0, 0.0, 0.9, 0.0], cos, [0]) == (0.0, True)  # full absorption needs only cos ≥ 0.025
    # absorbers below 0.4 of the projection: not absorption
    assert case(1.0, [0.0, 0.3, 0.0, 0.0], cos, [0]) == (0.0, False)
    # a negative main projection with absorbers present counts as full absorption of the fraction
    assert case(1.0, [-0.2, 0.9, 0.0, 0.0], cos, [0], codes=[0.1, 0.9, 0.0, 0.0]) == (1.0, False)  # main fires: not full
    # at most three absorbers count: four of 0.12 give 0.36 < 0.4
    assert case(1.0, [0.0, 0.12, 0.12, 0.12, 0.12], [0.9, 0.5, 0.5, 0.5, 0.5], [0])[0] == 0.0


def test_f1_weights_and_split_rule():
    truth = torch.tensor([True, True, False, False])
    assert f1_score(torch.tensor([True, False, True, False]), truth) == 0.5
    assert f1_score(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)) == 0.0
    w = balanced_weights(torch.tensor([True, False, False, False]))
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3], dtype=torch.float64))
    order = torch.tensor([7, 3, 5, 1])
    assert split_latents([0.5, 0.6, 0.62, 0.9], order, 0.03) == [7, 3]  # 0.62 is not 0.03 above 0.6: stop there
    assert split_latents([0.5, 0.5], order, 0.03) == [7]


def hierarchy(absorbed: bool, seed: int = 0, letters: int = 4, children: int = 40, words: int = 1200):
    """Words whose activation is (its letter's direction) + (its word-cluster child direction) + noise, in an
    orthonormal basis. The clean dictionary has one latent per letter and one per child. The absorbing one is the
    same except that for half of each letter's children the child latent's decoder is (letter + child)/√2 and, on
    those words, the letter latent stays silent: the letter is absorbed into the child latents, as in Chanin et al."""
    g = torch.Generator().manual_seed(seed)
    n_dirs = letters * (1 + children)
    basis, _ = torch.linalg.qr(torch.randn(n_dirs + 8, n_dirs + 8, generator=g, dtype=torch.float64))
    basis = basis[:n_dirs].float()
    parents, kids = basis[:letters], basis[letters:].view(letters, children, -1)
    letter = torch.randint(letters, (words,), generator=g)
    child = torch.randint(children, (words,), generator=g)
    x = parents[letter] + kids[letter, child] + 0.05 * torch.randn(words, basis.shape[1], generator=g)
    decoder = torch.cat([parents, kids.reshape(letters * children, -1)])
    codes = torch.zeros(words, len(decoder))
    kid_index = letters + letter * children + child
    hidden = absorbed & (child < children // 2)  # the absorbed words
    codes[torch.arange(words), letter] = torch.where(hidden, 0.0, 1.0)
    codes[torch.arange(words), kid_index] = torch.where(hidden, 2 ** 0.5, 1.0)
    if absorbed:
        for c in range(letters):
            for j in range(children // 2):
                decoder[letters + c * children + j] = (parents[c] + kids[c, j]) / 2 ** 0.5
    return x, codes, letter, decoder


@pytest.mark.parametrize("absorbed", [False, True])
def test_absorption_on_a_synthetic_hierarchy_where_the_answer_is_known(absorbed):
    x, codes, y, decoder = hierarchy(absorbed)
    train, test = slice(0, 800), slice(800, None)
    result = first_letter_absorption(x[train], codes[train], y[train], x[test], codes[test], y[test], decoder, "abcd",
                                     AbsorptionSettings(max_k=4, l1_steps=150))
    assert result["n_scored_letters"] == 4
    for letter, row in result["letters"].items():
        assert row["probe_f1"] > 0.95, letter
        assert row["main_latents"][0] == "abcd".index(letter), letter  # the letter latent ranks first
    score = result["mean"]["mean_absorption_fraction_score"]
    full = result["mean"]["mean_full_absorption_score"]
    if absorbed:  # half of each letter's words are absorbed by construction
        assert 0.35 < score < 0.65 and 0.35 < full < 0.65
    else:
        assert score < 0.02 and full < 0.02


def test_weak_probes_and_missing_letters_are_skipped_and_bad_shapes_refused():
    x, codes, y, decoder = hierarchy(False, words=400)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # no letter information at all
    result = first_letter_absorption(noise[:300], codes[:300], y[:300], noise[300:], codes[300:], y[300:], decoder, "abcde",
                                     AbsorptionSettings(max_k=2, l1_steps=20))
    assert "fewer than" in result["letters"]["e"]["skipped"]  # no word starts with e
    weak = [r for r in result["letters"].values() if "probe F1" in r.get("skipped", "")]
    assert len(weak) + result["n_scored_letters"] == 4 and len(weak) >= 3
    with pytest.raises(FeaturekitError, match="decoder"):
        first_letter_absorption(x, codes, y, x, codes, y, decoder[:, :5], "abcd")


def test_packed_prompts_read_every_word_once_at_its_own_token_after_the_examples(tiny):
    from transformers import AutoTokenizer

    from featurekit.evaluate.first_letter import TEMPLATE_SUFFIX, alpha_tokens, first_letter, packed_prompts, split_words

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    words = alpha_tokens(tok)
    assert len(words) == 28 and all(text.isalpha() for _, text in words)  # tests/tiny.py's words; no special token
    ids, pos, order = packed_prompts(tok, words, n_icl=3, words_per_sequence=5, seed=0)
    assert sorted(order) == list(range(len(words)))  # each word read exactly once
    read = pos[pos >= 0]
    rows = (pos >= 0).nonzero()[:, 0]
    assert ids[rows, read].tolist() == [words[i][0] for i in order]  # at the word's own token
    line = 1 + len(tok.encode(TEMPLATE_SUFFIX, add_special_tokens=False)) + 1 + len(tok.encode("\n", add_special_tokens=False))
    start = len(tok.encode("\n", add_special_tokens=False))
    assert (pos[:, 0] == start + 3 * line).all()  # after exactly n_icl example lines
    assert first_letter(" Apple") == 0 and first_letter("zoo") == 25
    train, test = split_words(words, None, 0.8, seed=0)
    assert len(train) == 22 and len(test) == 6 and not {w for w, _ in train} & {w for w, _ in test}
    with pytest.raises(FeaturekitError, match="absorption_words"):
        split_words(words, 1, 0.8, seed=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 10.0))
def test_absorption_fraction_is_a_fraction_and_scale_free(seed, scale):
    g = torch.Generator().manual_seed(seed)
    n, m = 16, 12
    codes = torch.relu(torch.randn(n, m, generator=g))
    cos = torch.rand(m, generator=g) * 2 - 1
    latent_proj = codes * cos[None]
    probe_proj = latent_proj.sum(1) + torch.randn(n, generator=g) * 0.3
    fraction, full = absorption_fractions(probe_proj, latent_proj, codes, cos, [0, 1])
    assert ((fraction >= 0) & (fraction <= 1)).all()
    assert (fraction[latent_proj[:, :2].sum(1) >= probe_proj] == 0).all()  # the main latents explain it: no absorption
    again, full_again = absorption_fractions(probe_proj * scale, latent_proj * scale, codes * scale, cos, [0, 1])
    assert torch.allclose(fraction, again, atol=1e-5) and torch.equal(full, full_again)
