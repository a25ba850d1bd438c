"""Labels for the probing tasks beyond BBC's topics (pipeline/probing_tasks.py), built from shipped text only.

Text source (`source_chunks`): which corpus a chunk of text comes from. Each corpus's documents (BBC articles,
Bible chapters, Shakespeare's works, Wikipedia articles when gensim is installed) are cut into consecutive
pieces of exactly `chunk_chars` characters (the tail shorter than that is dropped), so a long work gives many
chunks and a short article few. The split is by document: per corpus, documents are ranked by the held-out
hash of data/sources.py (`int(sha256[:16], 16)`) and the lowest-ranked `held_out_fraction` of them (at least
one, and always every document of the source's own held-out split) are held out; every chunk of a held-out
document is a test chunk, so no piece of a held-out work is in training. Chunks are taken round-robin over the
documents in hash order (first chunk of every document, then the second, ...) up to `per_class` per corpus, so
every corpus gives the same number where it has enough and no single long work fills a class.

Token classes (`token_labels`): binary labels of one token from its decoded string `t` alone:
- `digit`: t without surrounding whitespace is one or more ASCII digits 0-9;
- `capitalised_word`: t is a word start (a leading space) followed by one capital A-Z and only lower-case a-z;
- `plural_looking`: a word start of 4+ lower-case letters ending in 's' but not 'ss' ("cats", not "class");
- `month`: a word start whose word is a full English month name, May left out (also a verb and a name).
"""

from __future__ import annotations

import hashlib
import math
import re

from ..errors import FeaturekitError
from .sources import is_test_document, load_texts

SOURCE_CORPORA = ("bbc", "bible", "shakespeare", "wikipedia")
TOKEN_TASKS = ("digit", "capitalised_word", "plural_looking", "month")
MONTHS = frozenset("January February March April June July August September October November December".split())


def available_corpora() -> dict[str, list[str]]:
    """Every corpus of SOURCE_CORPORA that can be read here (Wikipedia needs gensim), all its documents."""
    out = {}
    for name in SOURCE_CORPORA:
        try:
            out[name] = load_texts(name, "all")
        except FeaturekitError:
            if name != "wikipedia":
                raise
    return out


def _rank(doc: str) -> int:
    return int(hashlib.sha256(doc.encode("utf-8")).hexdigest()[:16], 16)


def held_out_documents(docs: list[str], held_out_fraction: float) -> set[int]:
    """Indices of the held-out documents of one corpus (module docstring)."""
    if not 0 < held_out_fraction < 1:
        raise FeaturekitError(f"held_out_fraction must be between 0 and 1, got {held_out_fraction}")
    order = sorted(range(len(docs)), key=lambda i: _rank(docs[i]))
    n = max(1, math.ceil(held_out_fraction * len(docs)), sum(is_test_document(d) for d in docs))
    return set(order[:n])


def chunks(doc: str, chunk_chars: int) -> list[str]:
    """Consecutive pieces of exactly chunk_chars characters; the shorter tail is dropped."""
    if chunk_chars < 1:
        raise FeaturekitError(f"chunk_chars must be >= 1, got {chunk_chars}")
    return [doc[i:i + chunk_chars] for i in range(0, len(doc) - chunk_chars + 1, chunk_chars)]


def source_chunks(corpora: dict[str, list[str]], chunk_chars: int, per_class: int, split: str,
                  held_out_fraction: float = 0.2) -> list[tuple[str, str, int]]:
    """(chunk, corpus name, document index within its corpus) for `split` ("train" or "test"), per_class chunks
    per corpus at most, round-robin over the split's documents in hash order (module docstring)."""
    if split not in ("train", "test"):
        raise FeaturekitError(f"split must be 'train' or 'test', got {split!r}")
    out = []
    for name, docs in corpora.items():
        held = held_out_documents(docs, held_out_fraction)
        mine = sorted((i for i in range(len(docs)) if (i in held) == (split == "test")), key=lambda i: _rank(docs[i]))
        pieces = {i: chunks(docs[i], chunk_chars) for i in mine}
        taken, depth = [], 0
        while len(taken) < per_class and any(depth < len(p) for p in pieces.values()):
            for i in mine:
                if depth < len(pieces[i]) and len(taken) < per_class:
                    taken.append((pieces[i][depth], name, i))
            depth += 1
        out.extend(taken)
    return out


def token_labels(token: str) -> dict[str, bool]:
    """The four binary labels of TOKEN_TASKS for one decoded token string (module docstring)."""
    word = token[1:] if token.startswith(" ") else None
    return {"digit": re.fullmatch(r"[0-9]+", token.strip()) is not None,
            "capitalised_word": word is not None and re.fullmatch(r"[A-Z][a-z]+", word) is not None,
            "plural_looking": word is not None and re.fullmatch(r"[a-z]{3,}s", word) is not None and not word.endswith("ss"),
            "month": word is not None and word in MONTHS}
