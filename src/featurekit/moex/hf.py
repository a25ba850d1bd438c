"""A trained moex LM as a featurekit model: a `LoadedModel` with a character tokenizer.

``loaded_model(run_dir)`` reads a finished run folder that was trained on a text file (it holds
``vocab.json``, the characters in id order) and returns ``models.loading.LoadedModel`` with the LM and a
Hugging Face fast tokenizer over those characters, so code that takes a LoadedModel (hooks, harvest,
``data.tokens.tokenize``, autointerp's units) works on it; sites are those of the ``moex`` family
(``models/sites.py``). The tokenizer splits text into single characters; id ``len(vocab)`` (one past the
characters, reserved by ``stream.read_stream``) is ``<pad>``, which is also what an unknown character
becomes: a special token, so featurekit's token masks leave it out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._io import read_json
from ..errors import FeaturekitError
from ..models.loading import LoadedModel
from .stream import PAD
from .train import load_lm


def char_tokenizer(vocab: list[str]) -> Any:
    """A PreTrainedTokenizerFast mapping each character of ``vocab`` to its index, anything else to ``<pad>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if any(len(c) != 1 for c in vocab) or len(set(vocab)) != len(vocab):
        raise FeaturekitError("a character vocabulary must list distinct single characters")
    ids = {c: i for i, c in enumerate(vocab)}
    ids[PAD] = len(vocab)
    tok = Tokenizer(models.WordLevel(ids, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=PAD)


def loaded_model(run_dir: str | Path) -> LoadedModel:
    """The finished moex run in ``run_dir`` as a LoadedModel (module docstring)."""
    run_dir = Path(run_dir)
    model = load_lm(run_dir)
    if not (run_dir / "vocab.json").is_file():
        raise FeaturekitError(f"{run_dir} was trained on token ids, not on a text file: it has no vocab.json, so featurekit "
                              f"cannot build its tokenizer; use load_lm({str(run_dir)!r}) and your own tokenizer")
    vocab = read_json(run_dir / "vocab.json")
    if not isinstance(vocab, list) or len(vocab) + 1 > model.config.vocab_size:
        raise FeaturekitError(f"{run_dir / 'vocab.json'} does not match the model's vocab_size {model.config.vocab_size}")
    cfg = model.config
    return LoadedModel(model=model, tokenizer=char_tokenizer(vocab), name=str(run_dir), family="moex",
                       n_layers=cfg.n_layer, d_model=cfg.d_model)
