"""Splicing needs next-token logits: on an encoder without an LM head (BertModel through AutoModel)
the splice evaluations fail with a clear FeaturekitError before any forward pass, instead of the
AttributeError ('...PoolingAndCrossAttentions' object has no attribute 'logits') at the end of a run;
the same calls still score a causal LM."""

import pytest
import torch

from featurekit.dictionaries import TopKSAE, Transcoder
from featurekit.errors import FeaturekitError
from featurekit.evaluate.splice import splice_eval
from featurekit.evaluate.transcoders import transcoder_splice_eval
from featurekit.models import has_lm_head, load_model


def ids_and_mask(tokenizer, n=4):
    enc = tokenizer(["the cat sat on the mat while the big dog ran home"] * n, return_tensors="pt")
    mask = torch.ones_like(enc.input_ids, dtype=torch.bool)
    mask[:, 0] = False
    return enc.input_ids, mask


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return load_model(str(tiny_bert / "model"))


def test_splice_eval_refuses_an_encoder(bert):
    assert not has_lm_head(bert)
    ids, mask = ids_and_mask(bert.tokenizer)
    with pytest.raises(FeaturekitError, match=r"splice eval needs next-token logits.*BertModel.*no language-model "
                                              r"head.*has_lm_head"):
        splice_eval(bert.model, TopKSAE(32, 64, k=4), "resid_post.1", ids, mask, progress=False)


def test_transcoder_splice_eval_refuses_an_encoder(bert):
    ids, mask = ids_and_mask(bert.tokenizer)
    with pytest.raises(FeaturekitError, match=r"transcoder splice eval needs next-token logits.*BertModel"):
        transcoder_splice_eval(bert.model, {1: Transcoder(32, 64, k=4, d_out=32)}, ids, mask, progress=False)


def test_a_causal_lm_is_still_scored(tiny):
    llama = load_model(str(tiny / "model"))
    assert has_lm_head(llama)
    ids, mask = ids_and_mask(llama.tokenizer)
    result = splice_eval(llama.model, TopKSAE(32, 64, k=4), "resid_post.1", ids, mask, progress=False)
    assert result["splice_tokens"] > 0 and result["ce_clean"] > 0
