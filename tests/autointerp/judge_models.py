"""Tiny judge models with a chat template, saved as local folders (real models, served or loaded like any other):

- `constant`: a tiny Llama whose final norm is zero, so every next-token distribution is uniform and greedy
  decoding always picks token 0, which is "1": it answers "1 1 1 …" to everything (a constant judge);
- `salad`: a tiny random Llama that answers random words (a judge whose answers never parse).
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..tiny import WORDS

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_judge(root: Path, kind: str) -> Path:
    vocab = {w: i for i, w in enumerate(["1", "0", "[UNK]", "<pad>", "<bos>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    hf_tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                         bos_token_id=4, eos_token_id=5, pad_token_id=3))
    if kind == "constant":
        with torch.no_grad():
            model.model.norm.weight.zero_()
    folder = root / kind
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder
