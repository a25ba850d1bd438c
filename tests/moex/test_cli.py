"""`featurekit moex train` and the token-stream files it reads."""

import json

import pytest
import torch
from safetensors.torch import save_file

from featurekit.cli import main
from featurekit.data.tokens import tokenize
from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture_activations
from featurekit.models.loading import load_model
from featurekit.moex.stream import char_tokens, read_stream

PGN = "1.e4 e5 2.Nf3 Nc6 3.Bb5 a6 4.Ba4 Nf6 5.O-O Be7 " * 40
ARGS = ["--d-model", "16", "--n-layer", "1", "--n-head", "2", "--seq-len", "16", "--n-experts", "4", "--steps", "12",
        "--batch-size", "4", "--checkpoint-every", "5", "--quiet"]


def test_char_tokens_round_trip():
    ids, vocab = char_tokens("ab ba")
    assert vocab == [" ", "a", "b"]
    assert "".join(vocab[i] for i in ids.tolist()) == "ab ba"


def test_read_stream_text_and_safetensors(tmp_path):
    (tmp_path / "games.pgn").write_text(PGN, encoding="utf-8")
    tokens, vocab_size, vocab = read_stream(tmp_path / "games.pgn")
    assert tokens.numel() == len(PGN) and vocab_size == len(set(PGN)) + 1 and vocab == sorted(set(PGN))  # + <pad>
    save_file({"tokens": torch.arange(50, dtype=torch.int32) % 7, "vocab_size": torch.tensor(7)}, tmp_path / "ids.safetensors")
    tokens, vocab_size, vocab = read_stream(tmp_path / "ids.safetensors")
    assert tokens.dtype == torch.long and vocab_size == 7 and vocab is None
    save_file({"ids": torch.arange(5)}, tmp_path / "bad.safetensors")
    with pytest.raises(FeaturekitError, match="'tokens' tensor and a one-element 'vocab_size'"):
        read_stream(tmp_path / "bad.safetensors")
    with pytest.raises(FeaturekitError, match="no data file"):
        read_stream(tmp_path / "missing.txt")


def test_moex_train_command_trains_and_resumes(tmp_path, capsys):
    (tmp_path / "games.pgn").write_text(PGN, encoding="utf-8")
    run = tmp_path / "run"
    assert main(["moex", "train", str(run), "--data", str(tmp_path / "games.pgn"), "--kind", "moex", *ARGS]) == 0
    out = capsys.readouterr().out
    assert "moex: 12 steps" in out and "validation loss" in out
    assert json.loads((run / "vocab.json").read_text()) == sorted(set(PGN))
    first = json.loads((run / "summary.json").read_text())
    # the same command again: the run is complete, it continues from the last checkpoint (step 12) and trains nothing
    assert main(["moex", "train", str(run), "--data", str(tmp_path / "games.pgn"), "--kind", "moex", *ARGS]) == 0
    assert json.loads((run / "summary.json").read_text())["val_loss"] == first["val_loss"]
    # the finished run as a featurekit model: character tokenizer, sites, featurekit's tokenize and masks
    loaded = load_model(str(run))
    ids, keep = tokenize(loaded.tokenizer, ["1.e4 e5", "Nf3"])
    assert loaded.tokenizer.decode(ids[0].tolist()) == "1.e4 e5"
    assert ids[1, 3:].eq(len(set(PGN))).all() and not keep[1, 3:].any()  # padding: the reserved id, never kept
    acts = capture_activations(loaded, ids, ["mlp_hidden.0"])
    assert acts["mlp_hidden.0"].shape == (2, 7, 4 * 64)
    assert loaded.tokenizer("1.e4 §")["input_ids"][-1] == len(set(PGN))  # an unknown character → <pad>
    # another kind into the same folder is refused with a clear message (exit 2)
    assert main(["moex", "train", str(run), "--data", str(tmp_path / "games.pgn"), "--kind", "switch", *ARGS]) == 2
    assert "another config" in capsys.readouterr().err


def test_moex_train_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["moex", "train", str(tmp_path / "run"), "--data", str(tmp_path / "nope.txt"), *ARGS]) == 2
    assert "no data file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
