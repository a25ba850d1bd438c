"""A tiny random Llama with a word-level tokenizer, saved as a local model directory, and a local text
file of random sentences over its vocabulary: the pipeline's test bed (fixture `tiny` in conftest.py)."""

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a cat dog sat ran on under mat home far away sun rain and while big small red green "
         "bird fish tree river old new day night").split()


def write_tiny(root: Path) -> Path:
    """root/model (weights + tokenizer) and root/text.txt."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "<pad>", "<bos>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=2, eos_token_id=3, pad_token_id=1))
    model.save_pretrained(root / "model")
    hf_tok.save_pretrained(root / "model")
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(600)]
    (root / "text.txt").write_text("\n\n".join(paragraphs))
    return root
