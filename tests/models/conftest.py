"""Tiny random-weight models of every supported family (built from configs; nothing is downloaded)."""

import pytest
import torch
import transformers as tf

N_LAYERS = 3
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
              num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2)
DECODER = dict(COMMON, num_key_value_heads=2)

# name -> (model class, config); gemma3 uses head_dim 16 so attn_z (4*16=64) differs from d_model (32)
BUILDERS = {
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**DECODER)),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**DECODER)),
    "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(**DECODER)),
    "gemma": (tf.GemmaForCausalLM, lambda: tf.GemmaConfig(**DECODER, head_dim=8)),
    "gemma3": (tf.Gemma3ForCausalLM, lambda: tf.Gemma3TextConfig(**DECODER, head_dim=16, sliding_window=4)),
    "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=N_LAYERS, n_head=4,
                                                        n_positions=64, initializer_range=0.2)),
    "neox": (tf.GPTNeoXForCausalLM, lambda: tf.GPTNeoXConfig(**COMMON)),
    "bert": (tf.BertModel, lambda: tf.BertConfig(**COMMON)),
}
EXPECTED_FAMILY = {"llama": "llama", "qwen2": "llama", "mistral": "llama", "gemma": "gemma", "gemma3": "gemma",
                   "gpt2": "gpt2", "neox": "neox", "bert": "bert"}

_cache: dict[str, torch.nn.Module] = {}


def build(name: str) -> torch.nn.Module:
    """A tiny eval-mode model of the named kind (cached per session)."""
    if name not in _cache:
        cls, make_config = BUILDERS[name]
        torch.manual_seed(0)
        _cache[name] = cls(make_config()).eval()
    return _cache[name]


def model_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits for LMs, the last hidden state for encoders."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture(params=sorted(BUILDERS))
def family_model(request):
    """(name, model) for every tiny family model."""
    return request.param, build(request.param)


@pytest.fixture
def tiny_model():
    """The builder: tiny_model("gpt2") -> a tiny eval-mode GPT-2."""
    return build


@pytest.fixture
def output_of():
    """output_of(model, ids): logits (LMs) or last hidden state (encoders), without grad."""
    return model_output


@pytest.fixture
def expected_family():
    return EXPECTED_FAMILY


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 7), generator=g)
