"""A tiny random Llama with a word-level tokenizer, saved as a local model directory, and a local text
file of random sentences over its vocabulary: the pipeline's test bed (fixture `tiny` in conftest.py).
`write_tiny_bert` does the same for a tiny random BertModel, an encoder without an LM head (`tiny_bert`)."""

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    _write_text(root / "text.txt")
    return root


def write_tiny_bert(root: Path) -> Path:
    """root/model (a random BertModel, hidden 32, 3 layers, and a word-level tokenizer over WORDS that
    wraps a text as [CLS] ... [SEP]) and root/text.txt."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, max_position_embeddings=64, pad_token_id=0))
    model.save_pretrained(root / "model")
    hf_tok.save_pretrained(root / "model")
    _write_text(root / "text.txt")
    return root


def _write_text(path: Path) -> None:
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(600)]
    path.write_text("\n\n".join(paragraphs))
