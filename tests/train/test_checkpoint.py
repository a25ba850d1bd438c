"""Checkpoints: round trip, and a damaged state.json or tensor file is a clear error naming the folder."""

import json
import re

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.train.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint

TRAINER_META = {"step": 5, "tokens": 1280, "total_steps": 20, "digest": "d1", "optimizer_scalars": {}, "threads": 2}


def checkpoint(tmp_path, meta=TRAINER_META):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, {"sae.W_dec": torch.arange(12.0).view(3, 4)}, dict(meta))
    return folder


def test_round_trip_and_older_tensor_files_are_removed(tmp_path):
    folder = checkpoint(tmp_path)
    save_checkpoint(folder, {"sae.W_dec": torch.ones(3, 4)}, {**TRAINER_META, "step": 6})
    tensors, meta = load_checkpoint(folder)
    assert meta["step"] == 6 and torch.equal(tensors["sae.W_dec"], torch.ones(3, 4))
    assert [p.name for p in folder.glob("state-*.safetensors")] == ["state-000000006.safetensors"]
    assert read_checkpoint_meta(tmp_path / "absent") is None


def test_a_fitter_checkpoint_needs_no_trainer_fields(tmp_path):
    folder = checkpoint(tmp_path, {"kind": "fitter", "step": 2, "tokens": 64, "digest": ""})
    assert load_checkpoint(folder)[1]["step"] == 2


@pytest.mark.parametrize("content,words", [
    (b"", r"state.json is not valid JSON \(line 1, column 1"),
    (lambda good: good[:30], "state.json is not valid JSON"),
    (b"\xff\xfe\x00", "not UTF-8"),
    (b"[5, 1280]", "holds a JSON list, not an object"),
    (lambda good: good.replace(b'"step": 5,', b""), "has no 'step'"),
    (lambda good: good.replace(b'"total_steps": 20,', b""), "has no 'total_steps'"),
    (lambda good: good.replace(b'"step": 5', b'"step": "5"'), "'step' in .* must be an integer, got '5'"),
    (lambda good: good.replace(b'"tokens": 1280', b'"tokens": 12.5'), "'tokens' in .* must be an integer"),
    (lambda good: good.replace(b'"threads": 2', b'"threads": "2"'), "'threads' in .* must be an integer or null"),
    (lambda good: good.replace(b'"optimizer_scalars": {}', b'"optimizer_scalars": []'), "must be an object"),
    (lambda good: good.replace(b'"step": 5', b'"step": -5'), "'step' in .* is negative"),
    (lambda good: re.sub(rb'"tensors": "[^"]*"', b'"tensors": "../../x.safetensors"', good), "must name a state-STEP"),
])
def test_a_damaged_state_json_names_the_folder_and_the_way_out(tmp_path, content, words):
    folder = checkpoint(tmp_path)
    state = folder / "state.json"
    state.write_bytes(content(state.read_bytes()) if callable(content) else content)
    for read in (read_checkpoint_meta, load_checkpoint):
        with pytest.raises(FeaturekitError, match=rf"the checkpoint folder {re.escape(str(folder))} is damaged \(.*{words}") as caught:
            read(folder)
        assert f"delete {folder} to restart the run" in str(caught.value)


def test_a_damaged_or_missing_tensor_file_names_the_folder(tmp_path):
    folder = checkpoint(tmp_path)
    tensors = next(folder.glob("state-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-8])
    with pytest.raises(FeaturekitError, match=r"is damaged \(state-000000005.safetensors is missing or does not match"):
        load_checkpoint(folder)
    tensors.unlink()
    with pytest.raises(FeaturekitError, match=rf"delete {re.escape(str(folder))} to restart the run"):
        load_checkpoint(folder)


def test_state_json_is_written_as_strict_json(tmp_path):
    folder = checkpoint(tmp_path)
    assert json.loads((folder / "state.json").read_text())["tensors"] == "state-000000005.safetensors"
    with pytest.raises(FeaturekitError, match=r"optimizer_scalars.W.lr is nan"):
        save_checkpoint(folder, {"sae.W_dec": torch.ones(1)}, {**TRAINER_META, "step": 7, "optimizer_scalars": {"W.lr": float("nan")}})
    assert load_checkpoint(folder)[1]["step"] == 5  # the previous checkpoint is whole
    assert sorted(p.name for p in folder.iterdir()) == ["state-000000005.safetensors", "state.json"]  # the new one removed
