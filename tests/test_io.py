"""Atomic writes (a crash mid-write leaves the old file and no temporary files), operating-system
errors as FileErrors naming the file, strict JSON on write and read."""

import errno
import json
import math
import re
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError

from featurekit._io import FileError, atomic_folder, atomic_write, atomic_write_json, atomic_write_text, read_json
from featurekit.errors import FeaturekitError


def test_failed_write_leaves_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def half_then_crash(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# --- operating-system errors become FileErrors naming the file; JSON is strict --------------------


@pytest.mark.parametrize("exc,code,words", [
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC,
     "No space left on device; free space"),
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC, "No space left on device; free space"),
    (OSError(errno.EROFS, "Read-only file system"), errno.EROFS, "Read-only file system; the folder is read-only"),
])
def test_os_error_while_writing_names_the_file_and_removes_the_temp_file(tmp_path, exc, code, words):
    target = tmp_path / "state-000000007.safetensors"
    atomic_write_text(target, "old")

    def fail(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise exc

    with pytest.raises(FileError) as caught:
        atomic_write(target, fail)
    assert str(caught.value).startswith(f"could not write {target}: ") and words in str(caught.value)
    assert isinstance(caught.value, OSError) and caught.value.errno == code  # `except OSError` callers still work
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_unwritable_folder_is_named(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(FileError, match=rf"could not write {tmp_path / 'x.json'}: Permission denied; .*writable"):
        atomic_write_json(tmp_path / "x.json", {})


@pytest.mark.parametrize("obj,where", [
    ({"a": 1, "b": [0.5, {"c": math.nan}]}, "b[1].c is nan"),
    ({"loss": -math.inf}, "loss is -inf"),
    ([1.0, math.inf], "[1] is inf"),
    ({"density": torch.tensor([0.1, math.nan])}, "density[1] is nan"),
])
def test_json_write_refuses_nan_and_names_the_key(tmp_path, obj, where):
    with pytest.raises(FeaturekitError, match=rf"refusing to write {tmp_path / 'r.json'}: {re.escape(where)}, which JSON"):
        atomic_write_json(tmp_path / "r.json", obj)
    assert not list(tmp_path.iterdir())
    atomic_write_json(tmp_path / "r.json", {"x": 1.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1.5}


@pytest.mark.parametrize("content,words", [
    (b'{"a": 1', "not valid JSON (line 1, column 8"),
    (b"", "not valid JSON (line 1, column 1"),
    (b'{"a": "\xff"}', "not UTF-8 text (byte 7)"),
    (b'{"a": 1, "a": 2}', "key 'a' appears twice"),
    (b'{"a": NaN}', "bare NaN"),
])
def test_read_json_names_the_damaged_file(tmp_path, content, words):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(FeaturekitError, match=re.escape(f"{path}")) as caught:
        read_json(path)
    assert words in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers catching ValueError (JSONDecodeError's base) still do


def test_read_json_of_a_missing_file_is_a_file_error(tmp_path):
    with pytest.raises(FileError, match="could not read .*absent.json: No such file") as caught:
        read_json(tmp_path / "absent.json")
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOENT


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_read_json_of_any_bytes_returns_or_raises_featurekit_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/x.json"
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            read_json(path)
        except FeaturekitError as err:
            assert path in str(err)


def test_atomic_folder_replaces_the_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "dict"
    with atomic_folder(target) as staging:
        atomic_write_text(staging / "a.txt", "one")
        atomic_write_text(staging / "b.txt", "one")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]

    with pytest.raises(RuntimeError, match="crash"), atomic_folder(target) as staging:
        atomic_write_text(staging / "a.txt", "two")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "one" and (target / "b.txt").read_text() == "one"

    with atomic_folder(target) as staging:
        atomic_write_text(staging / "c.txt", "three")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]  # no stale file from the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict"]  # no staging or .old folder left


def test_atomic_folder_names_the_file_not_the_staging_folder(tmp_path):
    target = tmp_path / "dict"

    def fail(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FileError) as info, atomic_folder(target) as staging:
        atomic_write(staging / "model.safetensors", fail)
    assert str(target / "model.safetensors") in str(info.value) and "free space" in str(info.value)
    assert not target.exists() and list(tmp_path.iterdir()) == []
