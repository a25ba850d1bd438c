"""Tiny random models and transcoder sets for the circuits tests (built in memory, a fraction of a second)."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from featurekit.circuits.sets import CrossLayerSet, TranscoderSet
from featurekit.dictionaries import CrossLayerTranscoder, SkipTranscoder, Transcoder

D = 32


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


def tiny_gpt2(layers: int = 3, activation: str = "gelu_new") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=D, n_layer=layers, n_head=4, n_positions=64,
                                      activation_function=activation, bos_token_id=0, eos_token_id=0)).eval()


def random_transcoder(layer: int, skip: bool = False, n_latents: int = 64, k: int = 6) -> Transcoder:
    """Random weights on the scale of a tiny model's MLP output, with non-trivial normalisation scales
    (so folding them is exercised); `skip` gives a skip transcoder with a random W_skip."""
    tc = (SkipTranscoder if skip else Transcoder)(D, n_latents, k=k, d_out=D, seed=layer)
    gen = torch.Generator().manual_seed(100 + layer)
    with torch.no_grad():
        tc.W_dec.copy_(torch.randn(n_latents, D, generator=gen) * 0.002)
        tc.b_dec.copy_(torch.randn(D, generator=gen) * 0.001)
        tc.b_enc.copy_(torch.randn(n_latents, generator=gen) * 0.1)
        tc.input_scale.fill_(1.5 + layer)
        tc.output_scale.fill_(0.5)
        if skip:
            tc.W_skip.copy_(torch.randn(D, D, generator=gen) * 0.002)
    return tc.eval()


def random_set(layers: int = 3, model: str | None = None) -> TranscoderSet:
    """Layer 1 is a skip transcoder, the others plain."""
    return TranscoderSet({layer: random_transcoder(layer, skip=layer == 1) for layer in range(layers)}, model)


def random_clt(layers: int = 3, per_layer: int = 64, k: int = 6, model: str | None = None) -> CrossLayerSet:
    """A random CLT over every layer: decoders into the own layer and every later one (weights on the scale of a
    tiny model's MLP output), the blocks into earlier layers zero."""
    clt = CrossLayerTranscoder(layers * D, layers * per_layer, k=k, n_layers=layers, seed=3)
    gen = torch.Generator().manual_seed(200)
    with torch.no_grad():
        clt.W_dec.copy_(torch.randn(clt.W_dec.shape, generator=gen) * 0.002 * clt.decoder_mask())
        clt.b_dec.copy_(torch.randn(clt.d_out, generator=gen) * 0.001)
        clt.b_enc.copy_(torch.randn(clt.n_latents, generator=gen) * 0.1)
    return CrossLayerSet(clt.eval(), list(range(layers)), model)


def prompt(n: int = 9) -> torch.Tensor:
    return torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(7))
