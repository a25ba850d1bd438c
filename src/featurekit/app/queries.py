"""What each page reads from a run's feature store, as plain data (no HTML): the feature list, the searches and
the feature page. `benchmarks/store_queries.py` times these same functions."""

from __future__ import annotations

from typing import Any

from ..errors import FeaturekitError
from ..features.store import SORTS, FeatureStore
from .runs import Run

PAGE_SIZE = 50
SEARCH_LIMIT = 50
SORT_LABELS = {"density": "density", "max": "max activation", "min": "min activation", "fires": "fires", "id": "id"}
SEARCH_KINDS = ("auto", "token", "id", "explanation")


class BadRequest(FeaturekitError):
    """A request the page cannot answer as asked (shown as a 400 with its message)."""


class NotFound(FeaturekitError):
    """Something the URL names does not exist (shown as a 404 with its message)."""


def feature_list(run: Run, sort: str = "density", descending: bool = True, page: int = 1, live_only: bool = True) -> dict[str, Any]:
    """One page of the feature list, each row with its summary (top tokens, explanation)."""
    if sort not in SORTS:
        raise BadRequest(f"cannot sort by {sort!r}: use one of {', '.join(SORT_LABELS)}")
    total = run.n_live() if live_only else run.n_latents
    pages = max(1, -(-total // PAGE_SIZE))
    if page < 1 or page > pages:
        raise NotFound(f"page {page} does not exist: the list has {pages} page(s) of {PAGE_SIZE}")

    def read(store: FeatureStore) -> list[dict]:
        rows = store.list_features(sort, descending, (page - 1) * PAGE_SIZE, PAGE_SIZE, live_only)
        summaries = store.summaries((r["id"] for r in rows), n_tokens=5)
        return [{**r, **summaries.get(r["id"], {})} for r in rows]

    return {"rows": run.query(read), "total": total, "page": page, "pages": pages, "sort": sort,
            "descending": descending, "live_only": live_only}


def search(run: Run, q: str, by: str = "auto") -> dict[str, Any]:
    """Features by token text, by id or by explanation text. `auto`: an integer is an id; other text searches
    tokens and explanations. Returns {"redirect": id} when the answer is one feature's page."""
    if by not in SEARCH_KINDS:
        raise BadRequest(f"cannot search by {by!r}: use one of {', '.join(SEARCH_KINDS)}")
    if not q.strip():
        raise BadRequest("type something to search for: a token (e.g. ' Paris'), a feature id or words of an explanation")
    if getattr(run, "vision", False) and not (by in ("id", "auto") and q.strip().isdigit()):
        raise BadRequest(f"{run.name} is a vision run: its features are searched by id only (a whole number from 0 to "
                         f"{run.n_latents - 1}); images have no token text to search, and no explanations are stored")
    if by == "id" or (by == "auto" and q.strip().isdigit()):
        if not q.strip().isdigit():
            raise BadRequest(f"{q!r} is not a feature id: ids are whole numbers from 0 to {run.n_latents - 1}")
        feature = int(q.strip())
        if feature >= run.n_latents:
            raise NotFound(f"feature {feature} is not in this run: it has features 0–{run.n_latents - 1}")
        return {"redirect": feature}

    def read(store: FeatureStore) -> dict[str, Any]:
        tokens = store.search_token(q, SEARCH_LIMIT) if by in ("auto", "token") else None
        explained = store.search_explanations(q.strip(), SEARCH_LIMIT) if by in ("auto", "explanation") else None
        summaries = store.summaries([r["id"] for r in tokens or []] + [r["id"] for r in explained or []])
        return {"tokens": [{**r, **summaries.get(r["id"], {})} for r in tokens] if tokens is not None else None,
                "explanations": [{**r, **{k: v for k, v in summaries.get(r["id"], {}).items() if k != "explanation"}}
                                 for r in explained] if explained is not None else None}

    return {"q": q, "by": by, **run.query(read)}


def feature_page(run: Run, feature: int) -> dict[str, Any]:
    """Everything the feature page shows from the store: the store's feature record (`FeatureStore.feature`),
    the summaries of the features it links to, and each example group's value range."""
    if not 0 <= feature < run.n_latents:
        raise NotFound(f"feature {feature} is not in this run: it has features 0–{run.n_latents - 1}")

    def read(store: FeatureStore) -> dict[str, Any]:
        page = store.feature(feature)
        linked = [f for f, *_ in page["cofire"] or []] + [f for f, _ in page["neighbours"] or []]
        page["linked"] = store.summaries(linked)
        return page

    page = run.query(read)
    page["groups"] = example_groups(page["examples"], int(run.meta.get("bands", 5)))
    return page


def example_groups(examples: dict[str, list[dict]], bands: int) -> list[dict[str, Any]]:
    """The example sets in display order: top activations, then the quantile bands from the highest down; for
    signed codes the negative tail after them. Each: key, title, note, examples, sign (1 or -1)."""
    out = []

    def add(key: str, title: str, note: str, sign: int) -> None:
        rows = examples.get(key) or []
        if rows:
            values = [e["value"] for e in rows]
            out.append({"key": key, "title": title, "note": note, "examples": rows, "sign": sign,
                        "lo": min(values), "hi": max(values)})

    add("top", "Top activations", "the largest codes over the store's tokens", 1)
    for b in reversed(range(bands)):
        add(f"band{b}", f"Quantile band {b + 1} of {bands}", f"a uniform sample of the codes between the {b / bands:.0%} and "
            f"{(b + 1) / bands:.0%} quantiles of this feature's positive activations", 1)
    add("bottom", "Most negative activations", "the most negative codes (signed codes have two tails)", -1)
    for b in reversed(range(bands)):
        add(f"negband{b}", f"Negative quantile band {b + 1} of {bands}", f"a uniform sample of the codes between the "
            f"{b / bands:.0%} and {(b + 1) / bands:.0%} quantiles of |activation| in the negative tail", -1)
    return out

