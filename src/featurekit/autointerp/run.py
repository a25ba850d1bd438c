"""`featurekit explain RUN_DIR`: explain and score a run's features (or a control) in resumable stages.

pool → examples → explanations → scores → summary (+ the feature store's explanations table). Artefacts:
`stages.py`. `explain_run` is the Python API; the CLI calls it.

Units: the dictionary's features (`units="features"`), the model's MLP neurons at a layer
(`units="mlp_hidden.L"`) or random unit directions at the run's site (`units="random"`); with `shuffled`, each
explainer's explanations are also scored on other units (a seeded derangement): the chance level of every scorer.
Together with `summary.json`'s bootstrap intervals that is the measurement: features vs neurons vs random
directions vs shuffled explanations, on the same contexts, with the same judge.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import rundir
from .._io import atomic_write, atomic_write_json
from ..errors import FeaturekitError
from ..features.store import FeatureStore
from ..models.sites import site_dim
from . import examples as ex
from . import explainers, prompts, scorers
from .aggregate import summarise_run, write_store
from .cache import ReplayCache
from .judges import Asker, make_judge
from .pool import build_pool, load_pool
from .settings import Settings
from .stages import read_unit, stage, sweep, write_unit

CHUNK = 16  # units whose requests go to the judge together


def choose_units(kind: str, store: FeatureStore, n_units_total: int, ids: list[int] | None, n: int, seed: int) -> list[int]:
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < n_units_total]
        if bad:
            raise FeaturekitError(f"unit ids {bad[:5]} are outside 0–{n_units_total - 1} ({kind})")
        return sorted(set(ids))
    if kind == "random":
        return list(range(n_units_total))
    pool = ([r["id"] for r in store.list_features(sort="id", descending=False, limit=store.n_latents, live_only=True)]
            if kind == "features" else list(range(n_units_total)))
    return sorted(random.Random(f"{seed}:units").sample(pool, min(n, len(pool))))


class Explain:
    """One `explain_run` invocation's state: the run's model and store, the units, the judge, the folders."""

    def __init__(self, run_dir: Path, out: Path, units_kind: str, settings: Settings, judge: Any, cache: ReplayCache | None,
                 surprisal_model: str | None, progress: bool, overwrite: bool, device: str = "cpu") -> None:
        from .. import pipeline

        self.run_dir, self.out, self.kind, self.s = Path(run_dir), Path(out), units_kind, settings
        self.cfg = pipeline.load_run_config(run_dir)
        self.store = FeatureStore(self.run_dir)
        self.asker = Asker(judge, cache)
        self.judge = judge
        self.surprisal_model, self.progress, self.overwrite, self.device = surprisal_model, progress, overwrite, device
        self._loaded = self._units = self._embedder = self._lm = self._pool = self._tiles = None
        self.identity: dict = {}
        self.density: float | None = None
        self.n_total = 0

    # -- lazily loaded pieces --------------------------------------------------------------------------
    def loaded(self) -> Any:
        if self._loaded is None:
            from .. import pipeline

            self._loaded = pipeline.open_model(self.cfg)
        return self._loaded

    def units(self) -> Any:
        if self._units is None:
            from ..dictionaries import load
            from .units import FeatureUnits, NeuronUnits, RandomUnits

            model = self.loaded().model
            if self.kind == "features":
                device = next(model.parameters()).device
                self._units = FeatureUnits(load(self.run_dir / "dictionary", device=device), self.cfg.site)
            elif self.kind.startswith("mlp_hidden."):
                self._units = NeuronUnits(model, int(self.kind.split(".")[1]))
            else:
                self._units = RandomUnits(model, self.cfg.site, self.n_total, self.s.seed)
        return self._units

    def embedder(self) -> Any:
        if self._embedder is None:
            from .embed import Embedder

            self._embedder = Embedder()
        return self._embedder

    def lm(self) -> Any:
        if self._lm is None:
            from .hf import HFJudge, LocalLM

            if self.surprisal_model is None and isinstance(self.judge, HFJudge):
                self._lm = LocalLM(self.judge.name, loaded=self.judge.loaded)
            else:
                self._lm = LocalLM(self.surprisal_model or "smollm2-135m", device=self.device)
        return self._lm

    # -- stages --------------------------------------------------------------------------------------------
    def examples_identity(self) -> dict:
        density = self.s.density
        if self.kind != "features" and density is None:
            live = [d for d in self.store.densities() if d > 0]
            density = float(torch.tensor(live).median()) if live else 0.01
        self.density = density
        return {"store": {k: self.store.meta.get(k) for k in ("dictionary_sha256", "built", "n_latents", "site", "model")},
                "units": self.kind, "examples": dataclasses.asdict(self.s.examples), "rules": ex.VERSION,
                "pool_contexts": self.s.pool_contexts,
                "density": density, "seed": self.s.seed}

    def neighbours(self, unit: int, among: list[int]) -> list[int]:
        if self.kind == "features":
            page = self.store.feature(unit)
            ids = [int(i) for i, _ in page.get("neighbours") or []] + [int(r[0]) for r in page.get("cofire") or []]
            return [i for i in dict.fromkeys(ids) if i != unit][:self.s.examples.neighbours]
        return self.units().neighbours(unit, among, self.s.examples.neighbours)

    def pool(self, units: list[int]) -> Any:
        wanted = sorted(set(units) | {v for u in units for v in self.neighbours(u, units)})
        pool = self._pool or load_pool(self.out)
        if pool is not None and pool.meta.get("settings") == self.identity and set(wanted) <= set(pool.units):
            self._pool = pool
            return pool
        from ..pipeline.features import store_contexts

        loaded = self.loaded()
        ids, mask, _ = store_contexts(loaded, self.cfg)
        wanted = sorted(set(wanted) | (set(pool.units) if pool is not None and pool.meta.get("settings") == self.identity else set()))
        self._pool = build_pool(self.out, loaded.model, loaded.tokenizer, ids, mask, self.units(), wanted,
                                n_contexts=self.s.pool_contexts, seed=self.s.seed, batch_contexts=self.cfg.features.batch_contexts,
                                max_norm_multiple=self.cfg.data.max_norm_multiple, density=self.density, settings=self.identity,
                                progress=self.progress)
        (self.out / "pool_tiles.safetensors").unlink(missing_ok=True)
        return self._pool

    def tile_vectors(self, pool: Any) -> torch.Tensor:
        path = self.out / "pool_tiles.safetensors"
        if self._tiles is None and path.is_file():
            self._tiles = load_file(path)["vectors"]
        if self._tiles is None:
            self._tiles = ex.tile_embeddings(pool, self.s.examples, self.embedder())
            atomic_write(path, lambda tmp: save_file({"vectors": self._tiles.contiguous()}, tmp))
        return self._tiles

    def promoted(self, unit: int, k: int = 10) -> list[str]:
        if self.kind == "features":
            page = self.store.feature(unit)
            return [page["token_text"].get(t, "") for t, _ in page.get("logits_pos") or []][:k]
        units, model = self.units(), self.loaded().model
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or (self.kind == "random" and not self.cfg.site.startswith("resid")):
            return []
        logits = head.weight.detach().float().cpu() @ units.directions[unit].float()
        return self.loaded().tokenizer.batch_decode([[int(i)] for i in torch.topk(logits, k).indices])

    def build_examples(self, units: list[int]) -> dict[int, dict]:
        folder = self.out / "examples"
        records = {u: read_unit(folder, u) for u in units}
        todo = [u for u, r in records.items() if r is None]
        if todo:
            pool = self.pool(units)
            s = self.s.examples
            semantic = s.n_semantic > 0
            tiles = self.tile_vectors(pool) if semantic else None
            for u in todo:
                if self.kind == "features":
                    activating = ex.store_activating(self.store.feature(u), s)
                else:
                    rng = random.Random(f"{self.s.seed}:activating:{u}")
                    activating = ex.pool_activating(pool, u, s, 2 * s.n_explain, max(2, s.n_test // ex.N_BANDS + 1), rng)
                rec = ex.build_record(u, activating, pool, self.neighbours(u, units), s, self.s.seed, self.promoted(u),
                                      self.embedder() if semantic else None, tiles)
                write_unit(folder, u, rec)
                records[u] = rec
        return records

    def explain(self, explainer: str, records: dict[int, dict]) -> dict[int, dict]:
        ident = ({"explainer": explainer, "prompts": prompts.VERSION} if explainer in explainers.JUDGE_FREE else
                 {"judge": self.asker.identity, "explainer": explainer, "max_tokens": self.s.explain_tokens,
                  "prompts": prompts.VERSION})
        folder = stage(self.out / "explanations" / f"{explainer}@{self.judge.label}", ident, self.overwrite, "explanations")
        out = {u: read_unit(folder, u) for u, r in records.items() if not r["skipped"]}
        todo = [u for u, v in out.items() if v is None]
        if explainer in explainers.JUDGE_FREE:
            for u in todo:
                out[u] = explainers.judge_free(u, explainer, records[u])
                write_unit(folder, u, out[u])
            return out
        for k in range(0, len(todo), CHUNK):
            chunk = todo[k:k + CHUNK]
            answers = self.asker.ask([explainers.request(explainer, records[u], self.s.explain_tokens) for u in chunk])
            for u, a in zip(chunk, answers):
                out[u] = explainers.result(u, a)
                write_unit(folder, u, out[u])
        return out

    def score(self, folder: Path, scorer: str, records: dict[int, dict], texts: dict[int, str | None]) -> dict[int, dict]:
        """Scorer results of every unit with an explanation in `texts` (intruder: every unit with examples)."""
        out, judged = {}, []
        for u, text in texts.items():
            done = read_unit(folder, u)
            if done is not None:
                out[u] = done
            elif scorer in scorers.JUDGE_SCORERS:
                judged.append(u)
            elif scorer == "surprisal":
                out[u] = {"unit": u, **scorers.surprisal(records[u], text, self.lm())}
                write_unit(folder, u, out[u])
            else:
                out[u] = {"unit": u, **scorers.embedding(records[u], text, self.embedder())}
                write_unit(folder, u, out[u])
        for k in range(0, len(judged), CHUNK):
            plans = {u: scorers.requests(scorer, records[u], texts[u], self.s.scoring, self.s.seed) for u in judged[k:k + CHUNK]}
            flat = [r for reqs, _ in plans.values() for r in reqs]
            answers = iter(self.asker.ask(flat))
            for u, (reqs, plan) in plans.items():
                out[u] = {"unit": u, **scorers.finish(scorer, plan, [next(answers) for _ in reqs])}
                write_unit(folder, u, out[u])
        return out

    def scorer_identity(self, scorer: str) -> dict:
        ident: dict[str, Any] = {"scorer": scorer, "settings": dataclasses.asdict(self.s.scoring), "seed": self.s.seed,
                                 "prompts": prompts.VERSION}
        if scorer in scorers.JUDGE_SCORERS:
            ident["judge"] = self.asker.identity
        elif scorer == "surprisal":
            ident["lm"] = {"model": self.lm().label, "weights": self.lm().digest}
        else:
            ident["embedder"] = "all-MiniLM-L6-v2"
        return ident


def derangement(units: list[int], seed: int) -> dict[int, int]:
    """unit → another unit (a seeded permutation without fixed points; identity for fewer than two units)."""
    if len(units) < 2:
        return {u: u for u in units}
    rng = random.Random(f"{seed}:shuffle")
    while True:
        perm = units[:]
        rng.shuffle(perm)
        if all(a != b for a, b in zip(units, perm)):
            return dict(zip(units, perm))


def check_settings(out: Path, identity: dict, overwrite: bool) -> None:
    """OUT/settings.json records what the examples depend on: other settings are refused, or with `overwrite` every
    stage's artefacts go (the replay cache stays)."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != identity:
            if not overwrite:
                keys = rundir.differing_keys(old, identity)
                raise FeaturekitError(f"{out} holds autointerp results of another store or settings ({', '.join(keys)} differ): "
                                      f"pass --overwrite to redo them (the replay cache is kept), or --out for another folder")
            for name in ("examples", "explanations", "scores", "pool.json", "pool.safetensors", "pool_tiles.safetensors", "summary.json"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
    atomic_write_json(path, identity)


def score_all(job: Explain, records: dict[int, dict], judge: Any) -> dict:
    """Every explainer's explanations, their scores (and the shuffled control's), and the intruder test."""
    s, out = job.s, job.out
    results: dict[str, Any] = {"explanations": {}, "scores": {}}
    for explainer in s.explainers:
        expl = job.explain(explainer, records)
        results["explanations"][explainer] = expl
        texts = {u: e["explanation"] for u, e in expl.items() if e["explanation"]}
        variants = [("", texts)]
        if s.shuffled:
            perm = derangement(sorted(texts), s.seed)
            variants.append(("~shuffled", {u: texts[perm[u]] for u in texts}))
        for suffix, given in variants:
            for scorer in (x for x in s.scorers if x != "intruder"):
                folder = stage(out / "scores" / f"{explainer}@{judge.label}{suffix}" / scorer,
                               {**job.scorer_identity(scorer), "shuffled": bool(suffix)}, job.overwrite, f"{scorer} scores")
                results["scores"][(explainer + suffix, scorer)] = job.score(folder, scorer, records, given)
    if "intruder" in s.scorers:
        folder = stage(out / "scores" / f"intruder@{judge.label}", job.scorer_identity("intruder"), job.overwrite, "intruder scores")
        results["intruder"] = job.score(folder, "intruder", records, {u: None for u, r in records.items() if not r["skipped"]})
    return results


def explain_run(run_dir: str | Path, *, units: str = "features", ids: list[int] | None = None, n_units: int = 32,
                judge: Any = None, out: str | Path | None = None, cache: str | Path | None = None, settings: Settings | None = None,
                surprisal_model: str | None = None, write_to_store: bool = True, progress: bool = True,
                overwrite: bool = False, device: str = "cpu") -> dict:
    """Run (or resume) autointerp on a run's units (module docstring); returns the summary (also in OUT/summary.json).
    `judge`: a judge object or a spec for `make_judge` (default: the embedded SmolLM2). `cache`: the replay cache's
    folder (default OUT/cache; False: none). `device`: where in-process models (a judge given as a spec, the
    surprisal scorer's LM) run."""
    s = settings or Settings()
    s.check()
    run_dir = Path(run_dir)
    if units != "features" and units != "random" and not units.startswith("mlp_hidden."):
        raise FeaturekitError(f"--units {units!r}: use features, mlp_hidden.L (the model's MLP neurons at layer L) or random")
    out = Path(out) if out else run_dir / "autointerp" / units
    judge = make_judge(judge, device=device) if judge is None or isinstance(judge, str) else judge
    replay = None if cache is False else ReplayCache(Path(cache) if cache else out / "cache")
    started = time.time()
    with rundir.locked(out, f"explain {run_dir}"):
        sweep(out)
        job = Explain(run_dir, out, units, s, judge, replay, surprisal_model, progress, overwrite, device)
        try:
            job.identity = json.loads(json.dumps(job.examples_identity()))
            check_settings(out, job.identity, overwrite)
            if units == "features":
                job.n_total = job.store.n_latents
            elif units == "random":
                job.n_total = max([n_units] + [i + 1 for i in ids or []])
            else:
                job.n_total = site_dim(job.loaded().model, units)
            chosen = choose_units(units, job.store, job.n_total, ids, n_units, s.seed)
            records = job.build_examples(chosen)
            results = score_all(job, records, judge)
            summary = summarise_run(units, chosen, records, results, s, job.asker.identity, judge.label)
            atomic_write_json(out / "summary.json", summary)
            with open(out / "runs.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 3),
                                     "units": len(chosen), "judge": job.asker.identity, "requests": job.asker.stats.as_json(),
                                     "retries": getattr(judge, "retried", 0)}) + "\n")
            if write_to_store and units == "features":
                with rundir.locked(run_dir, f"explain {run_dir} (writing explanations into the feature store)"):
                    write_store(job.store.path, results, summary, judge.label)
        finally:
            job.store.close()
    summary["requests"] = job.asker.stats.as_json()
    return summary
