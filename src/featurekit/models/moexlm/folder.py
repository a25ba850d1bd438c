"""A trained MoexLM on disk, and as a featurekit model: ``model.safetensors`` + ``model.json`` (+ ``vocab.json``).

``save_lm`` / ``load_lm`` write and read the final model of a run folder (no pickle). ``is_lm_folder``
tells ``models.loading.load_model`` that a directory is such a folder, so ``featurekit run``, the feature
store, the explorer and autointerp take it by name like any other model: ``load_model(folder)`` returns
``models.loading.LoadedModel`` with the LM and a Hugging Face fast tokenizer over its characters
(``vocab.json``, written by ``featurekit moex train`` for a text file): the tokenizer splits text into single
characters; id ``len(vocab)`` (one past the characters, reserved by every character vocabulary) is ``<pad>``,
which is also what an unknown character becomes, and the eos token that separates packed documents (featurekit
packs a corpus with an eos between documents; the character LM was trained without one): a special token, so
featurekit's token masks leave it out.
Sites are those of the ``moex`` family (``models/sites.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..._io import atomic_write, atomic_write_json, read_json
from ...errors import FeaturekitError
from .lm import MODEL_TYPE, LMConfig, MoexLM

PAD = "<pad>"  # the reserved id len(vocab) of a character vocabulary


def save_lm(model: MoexLM, folder: Path) -> None:
    """``model.safetensors`` and ``model.json`` in ``folder``, atomically (weights first, then the config)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_json(folder / "model.json", model.config.to_dict())


def is_lm_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a MoexLM config (``model.json``; a moex run folder, finished or not)."""
    path = Path(folder) / "model.json"
    if not path.is_file():
        return False
    try:
        LMConfig.from_dict(read_json(path))
    except (FeaturekitError, TypeError, ValueError):
        return False
    return True


def load_config(folder: str | Path) -> LMConfig:
    """The LMConfig of a saved model (milliseconds; it reads like a Hugging Face config: model_type, num_hidden_layers)."""
    return LMConfig.from_dict(read_json(Path(folder) / "model.json"))


def load_lm(folder: str | Path) -> MoexLM:
    """The trained MoexLM in ``folder`` (a finished run folder), in eval mode; no pickle is read."""
    folder = Path(folder)
    if not (folder / "model.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FeaturekitError(f"{folder} holds no trained moex model (model.json + model.safetensors); train one with "
                              f"train_lm (or `featurekit moex train`) and let it finish")
    model = MoexLM(load_config(folder))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


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
    # <pad> is also the eos token: featurekit packs documents with an eos between them, and a character LM has none
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=PAD, eos_token=PAD,
                                   model_max_length=1 << 30)


def load_model_and_tokenizer(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MoexLM, Any]:
    """(MoexLM in ``dtype``, its character tokenizer) of a finished run folder trained on a text file."""
    folder = Path(folder)
    model = load_lm(folder).to(dtype)
    if not (folder / "vocab.json").is_file():
        raise FeaturekitError(f"{folder} was trained on token ids, not on a text file: it has no vocab.json, so featurekit "
                              f"cannot build its tokenizer; use load_lm({str(folder)!r}) and your own tokenizer")
    vocab = read_json(folder / "vocab.json")
    if not isinstance(vocab, list) or len(vocab) + 1 > model.config.vocab_size:
        raise FeaturekitError(f"{folder / 'vocab.json'} does not match the model's vocab_size {model.config.vocab_size}")
    return model, char_tokenizer(vocab)


__all__ = ["MODEL_TYPE", "PAD", "char_tokenizer", "is_lm_folder", "load_config", "load_lm", "load_model_and_tokenizer",
           "save_lm"]
