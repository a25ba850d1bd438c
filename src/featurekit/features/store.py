"""The feature store: one SQLite file per run (`RUN_DIR/features.sqlite`) with every latent's statistics,
examples, logit effects and neighbours, read by `featurekit serve`, the exports and autointerp.

Schema (version `SCHEMA_VERSION`; a file of a newer version, or not a feature store, is refused by name):

    meta(key TEXT PRIMARY KEY, value TEXT)            JSON values: schema_version, method, n_latents, site,
                                                      output_site, model, sources, n_tokens, context_len,
                                                      signed, hist_edges, dictionary_sha256, built, ...
    tokens(id INTEGER PRIMARY KEY, text TEXT)         every token id the store mentions, decoded
    contexts(id INTEGER PRIMARY KEY, token_ids BLOB)  the contexts examples come from (int32 ids)
    features(id INTEGER PRIMARY KEY, fires, density, mean, max, min,
             hist TEXT, top_tokens TEXT, cofire TEXT, logits_pos TEXT, logits_neg TEXT,
             neighbours TEXT, extra TEXT)             JSON lists (module docs of each field: `feature_page`)
    examples(feature, kind, rank, context, position, value, acts BLOB)
                                                      kind: top | bottom (signed) | band0..band4 (quantile bands,
                                                      lowest first; negb0.. for the negative tail); acts: the
                                                      feature's non-zero codes on the context, as int16
                                                      positions then float32 values
    token_features(token, feature, count, mean)       the inverse of top_tokens: search by token
    explanations(feature, explainer, text, score, details)   written by autointerp

A build writes a new file beside the old one and renames it over (`write_store`): a killed build leaves
the old store (or none), never half of one. Readers open the file read-only. The one change made in place:
autointerp's explanations (`write_explanations`, one SQLite transaction: all the rows or none). A rebuilt
store starts without explanations; `featurekit explain` writes them again from its artefacts (no judge calls).
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import FeaturekitError

SCHEMA_VERSION = 1
FILENAME = "features.sqlite"
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE contexts (id INTEGER PRIMARY KEY, token_ids BLOB NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY, fires INTEGER NOT NULL, density REAL NOT NULL, mean REAL, max REAL, min REAL,
    hist TEXT, top_tokens TEXT, cofire TEXT, logits_pos TEXT, logits_neg TEXT, neighbours TEXT, extra TEXT);
CREATE TABLE examples (
    feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, context INTEGER NOT NULL,
    position INTEGER NOT NULL, value REAL NOT NULL, acts BLOB NOT NULL, PRIMARY KEY (feature, kind, rank)) WITHOUT ROWID;
CREATE TABLE token_features (
    token INTEGER NOT NULL, feature INTEGER NOT NULL, count INTEGER NOT NULL, mean REAL NOT NULL,
    PRIMARY KEY (token, feature)) WITHOUT ROWID;
CREATE TABLE explanations (
    feature INTEGER NOT NULL, explainer TEXT NOT NULL, text TEXT NOT NULL, score REAL, details TEXT,
    PRIMARY KEY (feature, explainer)) WITHOUT ROWID;
"""
INDEXES = """
CREATE INDEX features_by_density ON features (density);
CREATE INDEX features_by_max ON features (max);
CREATE INDEX features_by_fires ON features (fires);
CREATE INDEX features_by_min ON features (min);
CREATE INDEX features_live_by_id ON features (id) WHERE fires > 0;
CREATE INDEX tokens_by_text ON tokens (text);
CREATE INDEX tokens_by_folded ON tokens (lower(trim(text)));
CREATE INDEX token_features_by_count ON token_features (token, count);
CREATE INDEX explanations_by_score ON explanations (score);
"""
SORTS = {"density": "density", "max": "max", "fires": "fires", "id": "id", "min": "min"}
#: per sort column, the condition on that column alone that keeps exactly the live features (fires > 0): a
#: page's ids then come from the column's index, without reading the features table's large rows
LIVE = {"density": "density > 0", "max": "max IS NOT NULL", "min": "min IS NOT NULL", "fires": "fires > 0"}
COLUMNS = ("id", "fires", "density", "mean", "max", "min")
TIE_SCAN = 1000  # search by token: rows read per token, so that ties at the cut are broken by share


def pack_acts(positions: Iterable[int], values: Iterable[float]) -> bytes:
    """A feature's non-zero codes on one context: n int16 positions, then n float32 values."""
    positions, values = list(positions), list(values)
    return struct.pack(f"<{len(positions)}h{len(values)}f", *positions, *values)


def unpack_acts(blob: bytes) -> tuple[list[int], list[float]]:
    n = len(blob) // 6
    data = struct.unpack(f"<{n}h{n}f", blob)
    return list(data[:n]), list(data[n:])


def pack_ids(ids: Iterable[int]) -> bytes:
    ids = list(ids)
    return struct.pack(f"<{len(ids)}i", *ids)


def unpack_ids(blob: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(blob) // 4}i", blob))


# -- writing --------------------------------------------------------------------------------------------
class StoreWriter:
    """Fills a new store file at a temporary path; `commit()` renames it over `path` (module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        self.db = sqlite3.connect(self.tmp)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)

    def meta(self, values: dict[str, Any]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()])

    def tokens(self, rows: Iterable[tuple[int, str]]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO tokens VALUES (?, ?)", rows)

    def contexts(self, rows: Iterable[tuple[int, bytes]]) -> None:
        self.db.executemany("INSERT INTO contexts VALUES (?, ?)", rows)

    def features(self, rows: Iterable[tuple]) -> None:
        """(id, fires, density, mean, max, min, hist, top_tokens, cofire, logits_pos, logits_neg, neighbours, extra),
        the last seven as JSON-able values."""
        self.db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            ((*r[:6], *(json.dumps(v) for v in r[6:])) for r in rows))

    def examples(self, rows: Iterable[tuple]) -> None:
        """(feature, kind, rank, context, position, value, acts blob)."""
        self.db.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def token_features(self, rows: Iterable[tuple[int, int, int, float]]) -> None:
        self.db.executemany("INSERT INTO token_features VALUES (?, ?, ?, ?)", rows)

    def commit(self) -> Path:
        """Index, flush and move the finished file over `path` (atomic: readers see the old or the new store)."""
        try:
            self.db.executescript(INDEXES)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('complete', 'true')")
            self.db.commit()
            self.db.close()
            with open(self.tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        try:
            self.db.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_explanations(path: str | os.PathLike, rows: Iterable[tuple]) -> int:
    """Insert (or replace, by feature and explainer) rows (feature, explainer, text, score, details) into the
    explanations table of the complete store at `path` (a run folder or the file), in one transaction; `details`
    is a JSON-able value or None. Returns the number of rows written."""
    store = FeatureStore(path)  # refuses what is not a complete store of a schema this featurekit reads
    file = store.path
    store.close()
    rows = [(int(f), str(e), str(t), None if s is None else float(s), None if d is None else json.dumps(d, allow_nan=False))
            for f, e, t, s, d in rows]
    db = sqlite3.connect(file, timeout=30.0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO explanations VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except sqlite3.Error as err:
        raise FeaturekitError(f"cannot write explanations into {file} ({err}): is it writable, and not being rebuilt?") from err
    finally:
        db.close()
    return len(rows)


# -- reading --------------------------------------------------------------------------------------------
class FeatureStore:
    """Read-only queries on a store file (`featurekit serve`, exports, autointerp)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / FILENAME
        if not self.path.is_file():
            raise FeaturekitError(f"no feature store at {self.path}: build it with `featurekit features RUN_DIR` "
                                  f"(or rerun `featurekit run`)")
        try:
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as err:
            raise FeaturekitError(f"{self.path} is not a featurekit feature store ({err}); rebuild it with "
                                  f"`featurekit features RUN_DIR`") from err
        try:
            self.meta = {k: json.loads(v) for k, v in meta.items()}
        except ValueError as err:
            raise FeaturekitError(f"{self.path}: its meta table is damaged ({err}); rebuild the store") from err
        version = self.meta.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise FeaturekitError(f"{self.path} has no valid schema_version: it is not a featurekit feature store")
        if version > SCHEMA_VERSION:
            raise FeaturekitError(f"{self.path} has store schema {version}, newer than this featurekit reads ({SCHEMA_VERSION}): "
                                  f"upgrade featurekit, or rebuild the store with this version")
        if not self.meta.get("complete"):
            raise FeaturekitError(f"{self.path} is incomplete (its build was interrupted): rebuild it")

    def close(self) -> None:
        self.db.close()

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def token_texts(self, ids: Iterable[int]) -> dict[int, str]:
        ids = sorted(set(int(i) for i in ids))
        out: dict[int, str] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[start:start + 900]
            out.update(self.db.execute(f"SELECT id, text FROM tokens WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall())
        return out

    def list_features(self, sort: str = "density", descending: bool = True, offset: int = 0, limit: int = 50,
                      live_only: bool = False) -> list[dict]:
        """A page of features with their summary statistics, sorted by `sort` (density, max, fires, min, id)."""
        if sort not in SORTS:
            raise FeaturekitError(f"cannot sort features by {sort!r}; use one of {sorted(SORTS)}")
        order, limit, offset = ("DESC" if descending else "ASC"), int(limit), int(offset)
        # the page's ids from an index alone (ties in the sort's direction: the index's own order), then its rows by id
        if sort == "id" and not live_only:  # every latent has a row: ids 0 … n_latents − 1
            ids = [self.n_latents - 1 - i if descending else i for i in range(offset, min(offset + limit, self.n_latents))]
        else:
            where = ("fires > 0" if sort == "id" else LIVE[sort]) if live_only else "1"  # id: the partial index features_live_by_id
            ties = "" if sort == "id" else f", id {order}"
            ids = [r[0] for r in self.db.execute(f"SELECT id FROM features WHERE {where} ORDER BY {SORTS[sort]} {order}{ties} "
                                                 f"LIMIT ? OFFSET ?", (limit, offset))]
        rows = {r[0]: r for r in self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM features WHERE id IN ({','.join('?' * len(ids))})",
                                                 ids)}
        return [dict(zip(COLUMNS, rows[i])) for i in ids]

    def count_features(self, live_only: bool = False) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM features {'WHERE fires > 0' if live_only else ''}").fetchone()[0]

    def search_token(self, text: str, limit: int = 50) -> list[dict]:
        """Features that fire on tokens whose text is `text` (exactly; else ignoring ASCII case and surrounding spaces;
        the counts of several matching tokens add up): most often first; ties by `share`, the part of the feature's
        firings that are on these tokens (count / fires: a feature about the token before one that fires everywhere),
        then id. Each: id, count, mean (its mean activation on the tokens), share, density."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM tokens WHERE text = ?", (text,))]
        if not ids:  # the expression index tokens_by_folded answers this (a store built without it: a scan)
            ids = [r[0] for r in self.db.execute("SELECT id FROM tokens WHERE lower(trim(text)) = lower(trim(?))", (text,))]
        if not ids:
            return []
        limit = int(limit)
        scan = max(limit, TIE_SCAN)
        # each token's `scan` most frequent features in index order (token, count, feature). One token: they hold the
        # answer (ties at the cut beyond `scan` rows are not all seen). Several: their totals over all the tokens are
        # exact, and so is the answer when the `limit`-th total exceeds the sum of each full list's last count (no
        # feature outside every list can count as much); otherwise every feature of the tokens is counted.
        per_token = [self.db.execute("SELECT feature, count, count * mean FROM token_features WHERE token = ? "
                                     "ORDER BY count DESC, feature DESC LIMIT ?", (t, scan)).fetchall() for t in ids]
        if len(ids) == 1:
            totals = {f: (c, w / c) for f, c, w in per_token[0]}
        else:
            totals = self._token_totals(ids, sorted({f for rows in per_token for f, *_ in rows}))
        counts = sorted((c for c, _ in totals.values()), reverse=True)
        if len(ids) > 1 and len(counts) >= limit and counts[limit - 1] <= sum(r[-1][1] for r in per_token if len(r) == scan):
            every = [r[0] for r in self.db.execute(f"SELECT DISTINCT feature FROM token_features WHERE token IN "
                                                   f"({','.join('?' * len(ids))})", ids)]
            totals = self._token_totals(ids, every)
            counts = sorted((c for c, _ in totals.values()), reverse=True)
        if not counts:
            return []
        cut = counts[min(limit, len(counts)) - 1]
        kept = [f for f, (c, _) in totals.items() if c >= cut]
        fires: dict[int, tuple[int, float]] = {}
        for start in range(0, len(kept), 900):
            chunk = kept[start:start + 900]
            fires.update((f, (n, d)) for f, n, d in self.db.execute(
                f"SELECT id, fires, density FROM features WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        share = {f: totals[f][0] / max(fires.get(f, (0, 0))[0], totals[f][0], 1) for f in kept}
        ranked = sorted(kept, key=lambda f: (-totals[f][0], -share[f], f))[:limit]
        return [{"id": f, "count": totals[f][0], "mean": totals[f][1], "share": share[f], "density": fires.get(f, (0, None))[1]}
                for f in ranked]

    def _token_totals(self, tokens: list[int], features: list[int]) -> dict[int, tuple[int, float]]:
        """feature → (count summed over `tokens`, count-weighted mean) for the given features."""
        out: dict[int, list[float]] = {}
        step = max(1, 900 - len(tokens))  # SQLite's bound-parameter limit
        for start in range(0, len(features), step):
            chunk = features[start:start + step]
            for f, c, s in self.db.execute(
                    f"SELECT feature, count, count * mean FROM token_features WHERE token IN ({','.join('?' * len(tokens))}) "
                    f"AND feature IN ({','.join('?' * len(chunk))})", (*tokens, *chunk)):
                acc = out.setdefault(f, [0, 0.0])
                acc[0] += c
                acc[1] += s
        return {f: (int(c), s / c) for f, (c, s) in out.items()}

    def densities(self) -> list[float]:
        """Every feature's density, by id (the run's density histogram); read from the density index alone."""
        out = [0.0] * self.n_latents
        for f, d in self.db.execute("SELECT id, density FROM features INDEXED BY features_by_density WHERE density >= 0"):
            out[f] = d
        return out

    def peaks(self) -> list[float | None]:
        """Every feature's largest |activation| over the store's tokens, by id (None: it never fired); read from the
        max and min indexes."""
        out: list[float | None] = [None] * self.n_latents
        for f, v in self.db.execute("SELECT id, max FROM features WHERE max IS NOT NULL"):
            out[f] = abs(v)
        for f, v in self.db.execute("SELECT id, min FROM features WHERE min IS NOT NULL"):
            out[f] = max(out[f] or 0.0, abs(v))
        return out

    def summaries(self, ids: Iterable[int], n_tokens: int = 3) -> dict[int, dict]:
        """id → {density, max, min, tokens (texts of its `n_tokens` most frequent tokens), explanation (the best
        scored one, or None)}: what a link to a feature shows beside its id. Ids not in the store are left out."""
        ids = sorted(set(int(i) for i in ids))
        out: dict[int, dict] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            marks = ",".join("?" * len(chunk))
            for f, density, vmax, vmin, top in self.db.execute(
                    f"SELECT id, density, max, min, top_tokens FROM features WHERE id IN ({marks})", chunk):
                out[f] = {"density": density, "max": vmax, "min": vmin,
                          "token_ids": [t for t, *_ in (json.loads(top) if top else [])[:n_tokens]], "explanation": None}
            for f, text in self.db.execute(f"SELECT feature, text FROM explanations WHERE feature IN ({marks}) "
                                           f"ORDER BY score IS NOT NULL, score", chunk):
                if f in out:
                    out[f]["explanation"] = text  # ascending score: the best one is written last
        texts = self.token_texts(t for s in out.values() for t in s["token_ids"])
        for s in out.values():
            s["tokens"] = [texts.get(t, "") for t in s.pop("token_ids")]
        return out

    def search_explanations(self, text: str, limit: int = 50) -> list[dict]:
        rows = self.db.execute("SELECT feature, explainer, text, score FROM explanations WHERE text LIKE ? "
                               "ORDER BY score DESC, feature LIMIT ?", (f"%{text}%", int(limit))).fetchall()
        return [{"id": f, "explainer": e, "text": t, "score": s} for f, e, t, s in rows]

    def feature(self, feature: int) -> dict:
        """Everything the feature page shows: statistics, histogram, top tokens, co-firing, logit effects,
        neighbours, explanations and the examples with their tokens and per-token activations."""
        row = self.db.execute("SELECT * FROM features WHERE id = ?", (int(feature),)).fetchone()
        if row is None:
            raise FeaturekitError(f"feature {feature} is not in this store: it holds features 0–{self.n_latents - 1}")
        names = [d[0] for d in self.db.execute("SELECT * FROM features LIMIT 0").description]
        page = dict(zip(names, row))
        for key in ("hist", "top_tokens", "cofire", "logits_pos", "logits_neg", "neighbours", "extra"):
            page[key] = json.loads(page[key]) if page[key] is not None else None
        page["examples"] = self.examples(feature)
        page["explanations"] = [dict(zip(("explainer", "text", "score", "details"), (e, t, s, json.loads(d) if d else None)))
                                for e, t, s, d in self.db.execute("SELECT explainer, text, score, details FROM explanations "
                                                                  "WHERE feature = ? ORDER BY score DESC", (int(feature),))]
        ids = [t for t, *_ in page["top_tokens"] or []] + [t for t, _ in (page["logits_pos"] or []) + (page["logits_neg"] or [])]
        page["token_text"] = self.token_texts(ids)
        return page

    def example_contexts(self, feature: int, kind: str = "top", limit: int = 16) -> list[tuple[list[int], int]]:
        """[(token ids of the context, position)] of the feature's `kind` examples, best rank first, at most `limit`:
        the inputs to recompute something on the contexts where it fires."""
        rows = self.db.execute("SELECT c.token_ids, e.position FROM examples e JOIN contexts c ON c.id = e.context "
                               "WHERE e.feature = ? AND e.kind = ? ORDER BY e.rank LIMIT ?",
                               (int(feature), str(kind), int(limit))).fetchall()
        return [(unpack_ids(ids), int(pos)) for ids, pos in rows]

    def examples(self, feature: int) -> dict[str, list[dict]]:
        """kind → examples, each with the context's tokens and the feature's activation on every token."""
        rows = self.db.execute("SELECT e.kind, e.rank, e.context, e.position, e.value, e.acts, c.token_ids FROM examples e "
                               "JOIN contexts c ON c.id = e.context WHERE e.feature = ? ORDER BY e.kind, e.rank",
                               (int(feature),)).fetchall()
        contexts = {ctx: unpack_ids(ids) for _, _, ctx, _, _, _, ids in rows}
        texts = self.token_texts(t for ids in contexts.values() for t in ids)
        out: dict[str, list[dict]] = {}
        for kind, _, ctx, pos, value, acts, _ in rows:
            ids = contexts[ctx]
            dense = [0.0] * len(ids)
            for p, v in zip(*unpack_acts(acts)):
                dense[p] = v
            out.setdefault(kind, []).append({"context": ctx, "position": pos, "value": value,
                                             "tokens": [texts.get(t, "") for t in ids], "acts": dense})
        return out
