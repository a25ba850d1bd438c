"""Packing and masking with a tiny word-level tokenizer built offline."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from featurekit.data.tokens import adds_bos, document_contexts, pack, separator_id, token_mask
from featurekit.errors import FeaturekitError

WORDS = "the cat sat on a mat and dog ran far away from home while sun shone".split()
SPECIALS = ["[UNK]", "<pad>", "<bos>", "<eos>"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
PAD, BOS, EOS = VOCAB["<pad>"], VOCAB["<bos>"], VOCAB["<eos>"]


def make_tokenizer(adds_bos: bool = False, eos: bool = True, bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                   bos_token="<bos>" if bos else None, eos_token="<eos>" if eos else None)


TOK = make_tokenizer()
TOK_BOS = make_tokenizer(adds_bos=True)
docs_strategy = st.lists(st.lists(st.sampled_from(WORDS), max_size=12).map(" ".join), max_size=12)


def stream(docs, sep=EOS):
    out = []
    for i, doc in enumerate(docs):
        if i:
            out.append(sep)
        out.extend(VOCAB[w] for w in doc.split())
    return out


@settings(max_examples=100, deadline=None)
@given(docs=docs_strategy, context_len=st.integers(1, 9), max_contexts=st.none() | st.integers(1, 6))
def test_pack_rows_preserve_the_stream(docs, context_len, max_contexts):
    expected = stream(docs)
    n = len(expected) // context_len
    if max_contexts is not None:
        n = min(n, max_contexts)
    if n == 0:
        with pytest.raises(FeaturekitError, match="fills no context"):
            pack(docs, TOK, context_len, max_contexts)
        return
    rows = pack(docs, TOK, context_len, max_contexts)
    assert rows.dtype == torch.long and rows.shape == (n, context_len)
    assert rows.flatten().tolist() == expected[:n * context_len]


@settings(max_examples=50, deadline=None)
@given(docs=docs_strategy, context_len=st.integers(2, 9))
def test_pack_prepends_bos_when_the_tokenizer_does(docs, context_len):
    expected = stream(docs)
    n = len(expected) // (context_len - 1)
    if n == 0:
        return
    rows = pack(docs, TOK_BOS, context_len)
    assert rows.shape == (n, context_len)
    assert (rows[:, 0] == BOS).all()
    assert rows[:, 1:].flatten().tolist() == expected[:n * (context_len - 1)]


def test_adds_bos_detection_and_override():
    assert not adds_bos(TOK) and adds_bos(TOK_BOS)
    docs = ["the cat sat on a mat"] * 3
    assert (pack(docs, TOK, 4, prepend_bos=True)[:, 0] == BOS).all()
    assert pack(docs, TOK_BOS, 4, prepend_bos=False).flatten().tolist() == stream(docs)[:20]
    with pytest.raises(FeaturekitError, match="context_len >= 2"):
        pack(docs, TOK_BOS, 1)


def test_separator_falls_back_to_bos_then_errors():
    assert separator_id(TOK) == EOS
    assert separator_id(make_tokenizer(eos=False)) == BOS
    no_sep = make_tokenizer(eos=False, bos=False)
    with pytest.raises(FeaturekitError, match="no eos, bos or sep"):
        pack(["the cat", "sat"], no_sep, 2)


def test_pack_is_lazy_for_small_max_contexts():
    def docs():
        yield from ["the cat sat on a mat"] * 40
        raise AssertionError("read past what max_contexts needs")

    assert pack(docs(), TOK, 3, max_contexts=2).shape == (2, 3)


def test_pack_rejects_empty_and_bad_input():
    for texts in ([], [""], ["   "]):
        with pytest.raises(FeaturekitError, match="fills no context"):
            pack(texts, TOK, 4)
    with pytest.raises(FeaturekitError, match="not one string"):
        pack("the cat sat", TOK, 2)
    with pytest.raises(FeaturekitError, match=">= 1"):
        pack(["the cat"], TOK, 0)


def test_token_mask_excludes_first_and_special():
    ids = torch.tensor([[BOS, VOCAB["the"], VOCAB["cat"], EOS, VOCAB["sat"]],
                        [VOCAB["dog"], PAD, VOCAB["ran"], VOCAB["far"], BOS]])
    mask = token_mask(ids, TOK)
    assert mask.dtype == torch.bool and mask.shape == ids.shape
    assert mask.tolist() == [[False, True, True, False, True], [False, False, True, True, False]]
    assert token_mask(ids, TOK, exclude_first=False)[1, 0]
    assert token_mask(ids, TOK, exclude_first=False, exclude_special=False).all()
    assert not token_mask(ids, TOK, exclude_special=False)[:, 0].any()
    with pytest.raises(FeaturekitError, match=r"\(N, T\)"):
        token_mask(ids[0], TOK)


def test_pack_then_mask_on_many_documents():
    docs = [" ".join(itertools.islice(itertools.cycle(WORDS), i, i + 7)) for i in range(50)]
    rows = pack(docs, TOK, 16)
    mask = token_mask(rows, TOK)
    assert not mask[:, 0].any()
    assert (mask == ((rows != EOS) & (torch.arange(16) > 0))).all()


def test_document_contexts_one_row_per_document_with_character_ends():
    ids, present, ends = document_contexts(["the cat  sat", "dog", "sun sat on a mat"], TOK, 4)
    assert ends.tolist() == [[3, 7, 12, -1], [3, -1, -1, -1], [3, 7, 10, 12]]  # the third document is cut at 4 tokens
    assert present.tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]
    assert ids[0, :3].tolist() == TOK("the cat sat", add_special_tokens=False)["input_ids"]
    assert (ids[~present] == PAD).all()
    ids, present, ends = document_contexts(["the cat  sat", ""], TOK_BOS, 3)  # BOS in front, as pack
    assert ids[:, 0].tolist() == [BOS, BOS] and ends.tolist() == [[-1, 3, 7], [-1, -1, -1]]
    assert present.tolist() == [[False, True, True], [False, False, False]]
    assert not (present & token_mask(ids, TOK_BOS))[:, 0].any()


def test_document_contexts_matches_the_tiny_models_tokenizer(tiny):
    from featurekit.models import load_model

    tokenizer = load_model(str(tiny / "model")).tokenizer
    ids, present, ends = document_contexts(["the cat  sat", "dog"], tokenizer, 4)
    assert ends.tolist() == [[3, 7, 12, -1], [3, -1, -1, -1]]
    assert ids[0, :3].tolist() == tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    assert (ids[~present] == tokenizer.pad_token_id).all()


def test_document_contexts_bad_input():
    for texts, tok, length, match in [("the cat", TOK, 4, "list of documents"), ([], TOK, 4, "at least one"),
                                      (["the cat"], TOK_BOS, 1, "no room")]:
        with pytest.raises(FeaturekitError, match=match):
            document_contexts(texts, tok, length)
