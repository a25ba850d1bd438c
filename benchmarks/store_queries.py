"""Query times of the explorer's pages on a feature store of 65,536 latents (`featurekit serve` at scale).

Builds a synthetic store with `featurekit.features.store.StoreWriter` at realistic sizes — per latent 20 top and
25 quantile-band examples (5 bands × 5) over a pool of 128-token contexts, each example with the latent's
non-zero codes on its context, a 64-bin histogram, 10 top tokens (and 64 in the search index), 10 co-firing
latents, 10 logit effects each way and 10 decoder neighbours; a Zipfian token distribution over a 49,152-token
vocabulary; 5 % of the latents dead — then times, through the same functions the app's pages call
(`featurekit.app.queries`):

    feature page     queries.feature_page(run, id)             random live ids (and with its HTML rendered)
    search by token  queries.search(run, text, "token")        frequent and rare tokens, exact and case-folded
    search by id     queries.search(run, "12345", "auto")
    list page        queries.feature_list(run, sort, desc, page)   first, middle and last pages, every sort

and prints p50 / p95 / max in milliseconds (target: p95 ≤ 50 ms). The store is cached under --dir (rebuilt with
--rebuild); building it takes a few minutes on 2 cores.

    python benchmarks/store_queries.py [--latents 65536] [--repeats 200] [--dir /tmp/featurekit-store-bench]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import time
from pathlib import Path

import numpy as np

from featurekit.app import queries, views
from featurekit.app.runs import Run
from featurekit.features.stats import BINS, bin_edges
from featurekit.features.store import FILENAME, INDEXES, SCHEMA_VERSION, StoreWriter, pack_acts, pack_ids

VOCAB = 49_152
CONTEXT_LEN = 128
TOP_N, BANDS, BAND_N = 20, 5, 5


def build(folder: Path, n_latents: int, n_contexts: int, seed: int = 0) -> Path:
    """The synthetic run folder (config.json + features.sqlite) described in the module docstring."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"site": "resid_post.6", "model": {"name": "synthetic"}}))
    zipf = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    zipf /= zipf.sum()
    writer = StoreWriter(folder / FILENAME)
    t0 = time.perf_counter()
    contexts = rng.choice(VOCAB, size=(n_contexts, CONTEXT_LEN), p=zipf).astype(np.int32)
    writer.contexts((c, pack_ids(contexts[c].tolist())) for c in range(n_contexts))
    writer.tokens((t, f" tok{t}" if t % 3 else f"Tok{t}") for t in range(VOCAB))
    density = np.exp(rng.uniform(np.log(1e-5), np.log(0.05), n_latents))
    dead = rng.random(n_latents) < 0.05
    density[dead] = 0.0
    n_tokens = 10_000_000
    pool = rng.choice(VOCAB, size=(n_latents, 96), p=zipf)  # each latent's tokens: a Zipfian draw, deduplicated below
    rows, examples, token_rows = [], [], []
    for f in range(n_latents):
        fires = int(density[f] * n_tokens)
        if fires:
            vmax = float(rng.uniform(1, 20))
            hist = np.bincount(np.clip(rng.normal(40, 4, min(fires, 2000)).astype(int), 0, BINS - 1), minlength=BINS).tolist()
            top_tokens = sorted(((int(t), int(rng.integers(1, fires + 1)), round(float(rng.uniform(0.1, vmax)), 6))
                                 for t in dict.fromkeys(pool[f].tolist()).keys()), key=lambda r: -r[1])[:64]
            token_rows += [(t, f, c, m) for t, c, m in top_tokens]
            values = np.sort(rng.uniform(0.1, vmax, TOP_N + BANDS * BAND_N))[::-1]
            kinds = [("top", r) for r in range(TOP_N)] + [(f"band{b}", r) for b in reversed(range(BANDS)) for r in range(BAND_N)]
            ctxs = rng.integers(n_contexts, size=len(kinds)).tolist()
            positions = np.sort(rng.choice(np.arange(1, CONTEXT_LEN), size=(len(kinds), 8)), axis=1).tolist()
            fractions = rng.uniform(0.05, 1, size=(len(kinds), 8)).tolist()
            for (kind, rank), value, ctx, pos, frac in zip(kinds, values.tolist(), ctxs, positions, fractions):
                pos = sorted(set(pos))
                acts = [value * x for x in frac[:len(pos)]]
                acts[len(pos) // 2] = value
                examples.append((f, kind, rank, ctx, pos[len(pos) // 2], value, pack_acts(pos, acts)))
            rows.append((f, fires, float(density[f]), vmax / 3, vmax, 0.05, {"positive": hist}, [list(t) for t in top_tokens[:10]],
                         [(int(g), round(float(rng.uniform(0, 0.5)), 4), int(rng.integers(1, 100)))
                          for g in rng.integers(0, n_latents, 10)],
                         [(int(t), round(float(rng.uniform(0, 2)), 4)) for t in rng.integers(0, VOCAB, 10)],
                         [(int(t), round(float(-rng.uniform(0, 2)), 4)) for t in rng.integers(0, VOCAB, 10)],
                         [(int(g), round(float(rng.uniform(0, 0.6)), 4)) for g in rng.integers(0, n_latents, 10)], None))
        else:
            rows.append((f, 0, 0.0, None, None, None, {}, [], [], None, None,
                         [(int(g), round(float(rng.uniform(0, 0.6)), 4)) for g in rng.integers(0, n_latents, 10)], None))
        if len(rows) >= 4096:
            writer.features(rows)
            writer.examples(examples)
            writer.token_features(token_rows)
            rows, examples, token_rows = [], [], []
            print(f"\r  {f + 1:,} / {n_latents:,} latents written ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    writer.features(rows)
    writer.examples(examples)
    writer.token_features(token_rows)
    writer.meta({"schema_version": SCHEMA_VERSION, "n_latents": n_latents, "d_in": 576, "method": "topk", "signed": False,
                 "site": "resid_post.6", "model": "synthetic", "n_tokens": n_tokens, "context_len": CONTEXT_LEN,
                 "n_contexts": n_contexts, "hist_edges": bin_edges(), "hist_bins": BINS, "top_n": TOP_N, "band_n": BAND_N,
                 "bands": BANDS, "sources": [{"source": "synthetic", "split": "all", "tokens": n_tokens}]})
    writer.commit()
    print(f"\r  store of {n_latents:,} latents built in {time.perf_counter() - t0:.0f} s: "
          f"{(folder / FILENAME).stat().st_size / 2**20:.0f} MiB" + " " * 20)
    return folder


EXPLANATION_WORDS = ("the word", "capital cities", "legal terms", "numbers in dates", "closing brackets", "verbs of motion",
                     "French names", "sports results", "past tense", "code identifiers", "quotes", "plural nouns")


def add_missing_indexes(path: Path) -> None:
    """A cached store built before an index joined `store.INDEXES` gets it, as a build today would; a store without
    explanations gets one per live latent (what autointerp writes: explainer, text, score)."""
    db = sqlite3.connect(path)
    if not db.execute("SELECT 1 FROM explanations LIMIT 1").fetchall():
        rng = random.Random(1)
        live = [r[0] for r in db.execute("SELECT id FROM features WHERE fires > 0")]
        db.executemany("INSERT INTO explanations VALUES (?, 'synthetic', ?, ?, NULL)",
                       [(f, f"{rng.choice(EXPLANATION_WORDS)} after {rng.choice(EXPLANATION_WORDS)} ({f})", rng.random()) for f in live])
        print(f"  added {len(live):,} explanations to the cached store")
    have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    for statement in INDEXES.strip().splitlines():
        if statement.split()[2] not in have:
            print(f"  adding {statement.split()[2]} to the cached store")
            db.execute(statement)
    db.commit()
    db.close()


def timed(fn, args_list: list[tuple]) -> list[float]:
    out = []
    for args in args_list:
        t = time.perf_counter()
        fn(*args)
        out.append(1000 * (time.perf_counter() - t))
    return out


def report(name: str, ms: list[float]) -> dict:
    ms = sorted(ms)
    p50, p95 = statistics.median(ms), ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    print(f"  {name:<38} n={len(ms):>4}  p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  max {ms[-1]:7.2f} ms"
          f"{'' if p95 <= 50 else '   ABOVE 50 ms'}")
    return {"name": name, "n": len(ms), "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "max_ms": round(ms[-1], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latents", type=int, default=65_536)
    ap.add_argument("--contexts", type=int, default=24_576, help="contexts in the example pool (SAEDashboard's default)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/featurekit-store-bench"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    folder = args.dir / f"latents{args.latents}"
    if args.rebuild or not (folder / FILENAME).is_file():
        build(folder, args.latents, args.contexts)
    add_missing_indexes(folder / FILENAME)
    run = Run(0, "bench", folder)
    rng = random.Random(0)
    live = [r["id"] for r in run.store.list_features("id", False, 0, args.latents, live_only=True)]
    n = args.repeats
    results = []
    print(f"store: {folder / FILENAME} ({(folder / FILENAME).stat().st_size / 2**20:.0f} MiB, {run.n_latents:,} latents, "
          f"{len(live):,} live)")
    queries.feature_page(run, live[0])  # first touch: page cache
    results.append(report("feature page", timed(queries.feature_page, [(run, rng.choice(live)) for _ in range(n)])))

    def rendered(f: int) -> str:  # what the server does for /r/RUN/f/ID, less the other runs' nearest features
        page = queries.feature_page(run, f)
        return views.render("feature.html", runs=[run], run=run, path="/", q="", section="features", f=page, others=[],
                            hist=views.act_histogram(page["hist"], run.meta["hist_edges"], page["density"]), fid=f)

    rendered(live[0])
    results.append(report("feature page, query + HTML", timed(rendered, [(rng.choice(live),) for _ in range(n)])))
    frequent = [f" tok{t}" for t in range(1, 60) if t % 3]
    rare = [f" tok{t}" for t in rng.sample(range(10_000, VOCAB), 200) if t % 3]
    results.append(report("search by token (frequent, exact)",
                          timed(queries.search, [(run, rng.choice(frequent), "token") for _ in range(n)])))
    results.append(report("search by token (rare, exact)", timed(queries.search, [(run, rng.choice(rare), "token") for _ in range(n)])))
    results.append(report("search by token (case-folded)", timed(queries.search, [(run, rng.choice(frequent).strip().upper(), "token")
                                                                                  for _ in range(max(20, n // 5))])))
    results.append(report("search by explanation", timed(queries.search, [(run, rng.choice(EXPLANATION_WORDS).split()[-1], "explanation")
                                                                          for _ in range(n)])))
    results.append(report("search by id", timed(queries.search, [(run, str(rng.randrange(run.n_latents)), "auto") for _ in range(n)])))
    pages = -(-run.n_live() // queries.PAGE_SIZE)
    for sort in queries.SORT_LABELS:
        calls = [(run, sort, rng.random() < 0.5, rng.choice([1, 2, pages // 2, pages - 1, pages])) for _ in range(max(20, n // 5))]
        results.append(report(f"list page (sort {sort})", timed(queries.feature_list, calls)))
    run.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
