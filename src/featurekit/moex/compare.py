"""The MoE-X comparison on chess (issue 24, "What it must show"): five LMs and an SAE, one table.

``compare(out_dir, settings)`` does, each step resumable and skipped when already done:

1. **data** — ``data/train`` and ``data/eval``: random/greedy legal games (chess.build_dataset) under two seeds,
   so evaluation games are unseen.
2. **plan** — ``plan.json``: the settings and the step count. ``steps`` fixes it; ``minutes_per_model`` times a
   few MoE-X steps (the slowest kind) and picks the steps that take MoE-X about that long, once; a rerun reuses
   the plan and refuses other settings (use another OUT_DIR).
3. **models** — ``runs/<name>``, moex.train run folders, the same steps × batch × seq_len tokens each, at equal
   activated MLP parameters (lm.activated_mlp_params; top_k experts of width H/top_k): ``dense_gelu``,
   ``dense_relu``, ``switch``, ``moex`` (from scratch) and ``moex_upcycled`` (experts copied from the finished
   ``dense_relu`` run, then the same number of steps again: it has seen twice the tokens, counting its dense start).
4. **sae** — ``runs/sae``: a TopK SAE (dictionaries.TopKSAE, train.Trainer) on the dense GELU model's
   ``mlp_hidden.L`` (the input of ``blocks[L].mlp.down``), harvested with capture_activations on training
   windows. Latents: M·D, MoE-X's unit count; k: ``sae_k``, or (0) MoE-X's measured mean L0 at that layer
   (its nonzero gated units per evaluated position), so both have the same number of active units.
5. **metrics** — ``runs/<name>/eval.json`` for each: validation loss (the SAE's: the dense GELU model with the
   SAE's reconstruction spliced into that layer), legal-move rate of greedy continuations from held-out game
   prefixes (the SAE's: spliced), and, on the units of layer L (MLP hidden units; the SAE's latents) at the
   ``.`` positions of the evaluation games (Karvonen cut: first ``max_chars`` characters, 20 dots a game),
   BSP coverage and board reconstruction on the ``board`` group (piece on square): labels from the first half
   of the evaluation games, scored on the second half; coverage over all evaluation positions.
6. ``results.json`` and ``results.md``, written atomically, beside the paper's numbers.

The library uses the caller's torch thread count; `featurekit moex compare` sets one thread (``--threads``).
Guide: docs/moex.md.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, atomic_write_text, read_json
from ..errors import FeaturekitError
from ..models.hooks import capture_activations
from .chess import (
    VOCAB,
    GameSpec,
    board_reconstruction,
    bsp_coverage,
    bsp_table,
    build_dataset,
    encode,
    greedy_sampler,
    legal_move_rate,
    move_prefixes,
    read_games,
    token_stream,
)
from .lm import LMConfig, MoexLM
from .train import TrainSettings, batch_at, evaluate_loss, load_lm, split_stream, train_lm

MODELS = ("dense_gelu", "dense_relu", "switch", "moex", "moex_upcycled")
ENTRIES = MODELS + ("sae",)
KIND = {"dense_gelu": "dense_gelu", "dense_relu": "dense_relu", "switch": "switch", "moex": "moex", "moex_upcycled": "moex"}
# Yang et al. 2025 (MoE-X), chess, equal activated parameters: BSP coverage, board reconstruction, validation loss.
# Table 1 (dense GELU = GPT-2, ReLU, Switch, MoE-X) and Table 4 (training: MoE-X from scratch vs upcycled; its
# upcycled row equals Table 1's MoE-X row). Transcribed in shared/research/seed-methods-other.md §4.5.
PAPER = {"dense_gelu": {"coverage": 0.356, "reconstruction": 0.608, "val_loss": 0.213, "source": "Table 1 (GELU)"},
         "dense_relu": {"coverage": 0.312, "reconstruction": 0.581, "val_loss": 0.215, "source": "Table 1 (ReLU)"},
         "switch": {"coverage": 0.424, "reconstruction": 0.734, "val_loss": 0.212, "source": "Table 1 (Switch)"},
         "moex": {"coverage": 0.398, "reconstruction": 0.657, "val_loss": None, "source": "Table 4 (from scratch)"},
         "moex_upcycled": {"coverage": 0.428, "reconstruction": 0.840, "val_loss": 0.211,
                           "source": "Table 1 (MoE-X) = Table 4 (upcycled)"},
         "sae": None}
# Characters the models read: the 32 of the chess format; id 32 is the reserved <pad> of moex.stream, so
# moex.hf.loaded_model (and featurekit's sites, explorer, autointerp) reads these run folders too.
N_CHARS = len(VOCAB)


@dataclass
class CompareSettings:
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 256
    n_experts: int = 8
    top_k: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    steps: int = 0                  # optimiser steps per model; 0: from minutes_per_model
    minutes_per_model: float = 0.0  # time budget of the slowest kind (MoE-X), used to choose steps once
    checkpoint_every: int = 100
    games: int = 2000               # training games
    eval_games: int = 100           # held-out games (half label the units, half score the reconstruction)
    max_chars: int = 256            # game length cap (Karvonen et al.'s evaluation cut); at most seq_len
    greedy: float = 0.5             # chance of the one-ply heuristic's move instead of a random legal one
    layer: int = -1                 # the layer whose units are read (-1: the last)
    legal_prefixes: int = 200       # held-out prefixes for the legal-move rate
    sae_k: int = 0                  # 0: MoE-X's measured L0 at the layer
    sae_latents: int = 0            # 0: n_experts · expert width (MoE-X's units)
    sae_tokens: int = 65_536        # activations harvested for the SAE
    sae_batch: int = 1024
    sae_epochs: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.steps > 0) == (self.minutes_per_model > 0):
            raise FeaturekitError("give exactly one of steps (a fixed step count) or minutes_per_model (a time budget "
                                  f"for the slowest model); got steps={self.steps}, minutes_per_model={self.minutes_per_model}")
        if self.max_chars > self.seq_len:
            raise FeaturekitError(f"max_chars={self.max_chars} > seq_len={self.seq_len}: a whole game must fit the context; "
                                  "lower max_chars or raise seq_len")
        if not -self.n_layer <= self.layer < self.n_layer:
            raise FeaturekitError(f"layer={self.layer} is not one of the {self.n_layer} layers (use 0..{self.n_layer - 1} or -1)")
        if self.eval_games < 2 or self.games < 1 or self.legal_prefixes < 1:
            raise FeaturekitError("games ≥ 1, eval_games ≥ 2 (two halves) and legal_prefixes ≥ 1 needed")

    @property
    def layer_index(self) -> int:
        return self.layer % self.n_layer

    def lm(self, name: str) -> LMConfig:
        return LMConfig(vocab_size=N_CHARS + 1, mlp=KIND[name], d_model=self.d_model, n_layer=self.n_layer,
                        n_head=self.n_head, seq_len=self.seq_len, n_experts=self.n_experts, top_k=self.top_k)

    def train(self, steps: int) -> TrainSettings:
        return TrainSettings(steps=steps, batch_size=self.batch_size, lr=self.lr, checkpoint_every=self.checkpoint_every,
                             seed=self.seed)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


# --- data and plan -----------------------------------------------------------------------------------

def datasets(out: Path, s: CompareSettings, progress: bool) -> tuple[list[str], list[str]]:
    spec = GameSpec(greedy=s.greedy, max_chars=s.max_chars)
    build_dataset(out / "data" / "train", seed=s.seed, count=s.games, spec=spec, progress=progress)
    build_dataset(out / "data" / "eval", seed=s.seed + 1, count=s.eval_games, spec=spec, progress=progress)
    return read_games(out / "data" / "train"), read_games(out / "data" / "eval")


def seconds_per_step(s: CompareSettings, stream: torch.Tensor, trials: int = 3) -> float:
    """Measured seconds of one MoE-X training step (forward, backward, AdamW) at these settings."""
    torch.manual_seed(s.seed)
    model = MoexLM(s.lm("moex"))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    times = []
    for step in range(trials + 1):  # the first is a warm-up
        began = time.perf_counter()
        x, y = batch_at(stream, step, s.batch_size, s.seq_len, s.seed)
        ce, aux = model.loss(x, y)
        opt.zero_grad()
        (ce + model.config.aux_weight * aux).backward()
        opt.step()
        times.append(time.perf_counter() - began)
    return sorted(times[1:])[len(times[1:]) // 2]


def plan(out: Path, s: CompareSettings, stream: torch.Tensor, progress: bool) -> dict[str, Any]:
    path = out / "plan.json"
    if path.exists():
        old = read_json(path)
        if old.get("settings") != asdict(s):
            changed = sorted(k for k in asdict(s) if old.get("settings", {}).get(k) != asdict(s)[k])
            raise FeaturekitError(f"{out} holds a comparison with other settings ({', '.join(changed)} differ); rerun with "
                                  "the same settings to resume it, or give another OUT_DIR")
        return old
    if s.steps:
        steps, measured = s.steps, None
    else:
        measured = seconds_per_step(s, stream)
        steps = max(1, int(s.minutes_per_model * 60 / measured))
        _log(f"MoE-X: {measured:.3f} s/step measured -> {steps} steps per model for ~{s.minutes_per_model} min", progress)
    doc = {"settings": asdict(s), "steps": steps, "moex_seconds_per_step": measured,
           "tokens_per_model": steps * s.batch_size * s.seq_len}
    atomic_write_json(path, doc)
    return doc


# --- training ----------------------------------------------------------------------------------------

def _finished(run: Path, steps: int) -> bool:
    summary = run / "summary.json"
    return summary.exists() and (run / "model.safetensors").exists() and read_json(summary).get("steps") == steps


def train_models(out: Path, s: CompareSettings, stream: torch.Tensor, steps: int, progress: bool) -> dict[str, float | None]:
    """Train every LM not yet finished; returns the wall seconds of those trained now (None: skipped)."""
    walls: dict[str, float | None] = {}
    for name in MODELS:
        run = out / "runs" / name
        if _finished(run, steps):
            walls[name] = None
            _log(f"{name}: finished before, skipped", progress)
            continue
        began = time.time()
        upcycle = out / "runs" / "dense_relu" if name == "moex_upcycled" else None
        summary = train_lm(run, stream, s.lm(name), s.train(steps), upcycle_from=upcycle, vocab=list(VOCAB), progress=progress)
        walls[name] = round(time.time() - began, 1)
        atomic_write_json(run / "wall.json", {"seconds": walls[name]})
        _log(f"{name}: val loss {summary['val_loss']:.4f} in {walls[name]} s", progress)
    return walls


def hidden(model: MoexLM, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, T, units) of site ``mlp_hidden.layer`` (the input of ``blocks[layer].mlp.down``)."""
    site = f"mlp_hidden.{layer}"
    return capture_activations(model, ids, [site])[site].float()


def harvest(model: MoexLM, stream: torch.Tensor, layer: int, tokens: int, batch: int, seed: int) -> torch.Tensor:
    """(tokens, units) hidden activations on training windows (batches numbered apart from training's)."""
    seq = model.config.seq_len
    rows, step = [], 1 << 41
    while sum(r.shape[0] for r in rows) < tokens:
        x, _ = batch_at(stream, step, batch, seq, seed)
        rows.append(hidden(model, x, layer).reshape(-1, model.blocks[layer].mlp.down.in_features))
        step += 1
    return torch.cat(rows)[:tokens]


def train_sae(out: Path, s: CompareSettings, stream: torch.Tensor, k: int, progress: bool) -> dict[str, Any]:
    """The TopK SAE on the dense GELU model's layer; skipped when ``runs/sae/sae`` exists with the same k."""
    from ..config.schema import TrainConfig
    from ..dictionaries import fileformat
    from ..dictionaries.topk import TopKSAE
    from ..train import Trainer

    run = out / "runs" / "sae"
    n_latents = s.sae_latents or s.n_experts * s.lm("moex").expert_width
    info_path = run / "sae.json"
    if info_path.exists() and (run / "sae" / "model.safetensors").exists():
        info = read_json(info_path)
        if info.get("k") == k and info.get("n_latents") == n_latents:
            _log("sae: finished before, skipped", progress)
            return {**info, "wall_s_now": None}
    began = time.time()
    dense = load_lm(out / "runs" / "dense_gelu")
    acts = harvest(dense, stream, s.layer_index, s.sae_tokens, 16, s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    per_epoch = max(1, acts.shape[0] // s.sae_batch)
    steps = per_epoch * s.sae_epochs
    k = max(1, min(k, n_latents))
    sae = TopKSAE(acts.shape[1], n_latents, k=k, seed=s.seed)
    cfg = TrainConfig(batch_size=s.sae_batch, threads=torch.get_num_threads(), checkpoint_every=max(steps, 1), seed=s.seed,
                      dead_tokens=max(1, acts.shape[0] // 4))
    trainer = Trainer(sae, cfg, run / "train", steps)
    trainer.init_from_data(acts[: min(8192, acts.shape[0])])

    def batches():
        for _ in range(s.sae_epochs):
            order = torch.randperm(acts.shape[0], generator=gen)
            for i in range(per_epoch):
                yield acts[order[i * s.sae_batch:(i + 1) * s.sae_batch]]

    trainer.fit(batches(), progress=progress)
    with torch.no_grad():
        x = acts[:4096]
        recon = sae.decode(sae.encode(x))
        fvu = float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    fileformat.save(sae, run / "sae", {"source": {"model": str(out / "runs" / "dense_gelu"), "site": f"mlp_hidden.{s.layer_index}"}})
    info = {"k": k, "n_latents": n_latents, "d_in": acts.shape[1], "steps": steps, "tokens": int(acts.shape[0]),
            "fvu_train": round(fvu, 4), "wall_s": round(time.time() - began, 1)}
    atomic_write_json(info_path, info)
    _log(f"sae: k={k}, {n_latents} latents, FVU {fvu:.3f} on training activations, {info['wall_s']} s", progress)
    return {**info, "wall_s_now": info["wall_s"]}


# --- metrics -----------------------------------------------------------------------------------------

class _Chess(torch.nn.Module):
    """The LM's logits over the 32 chess characters (drops <pad>), for greedy_sampler."""

    def __init__(self, model: MoexLM):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits[..., :N_CHARS]


def spliced(model: MoexLM, layer: int, sae: Any) -> Callable[[], None]:
    """Replace layer ``layer``'s MLP hidden units by the SAE's reconstruction; returns the undo."""
    def pre(_module, args):
        return (sae.decode(sae.encode(args[0])),)
    handle = model.blocks[layer].mlp.down.register_forward_pre_hook(pre)
    return handle.remove


def unit_acts(model: MoexLM, games: list[str], layer: int, encode_units: Callable | None) -> list[torch.Tensor]:
    out = []
    for game in games:
        h = hidden(model, encode(game)[None], layer)[0]
        out.append(encode_units(h) if encode_units is not None else h)
    return out


def legal_prefix_set(games: list[str], count: int, seed: int) -> list[str]:
    prefixes = [p for g in games for p in move_prefixes(g)]
    rng = random.Random(f"featurekit.moex.compare:{seed}")
    return rng.sample(prefixes, min(count, len(prefixes)))


def evaluate(name: str, model: MoexLM, s: CompareSettings, eval_games: list[str], val_part: torch.Tensor,
             sae: Any = None) -> dict[str, Any]:
    layer = s.layer_index
    undo = spliced(model, layer, sae) if sae is not None else None
    try:
        val_loss = evaluate_loss(model, val_part, 8, s.batch_size, s.seed)
        legal = legal_move_rate(legal_prefix_set(eval_games, s.legal_prefixes, s.seed),
                                sample=greedy_sampler(_Chess(model).eval(), context=s.seq_len))
    finally:
        if undo is not None:
            undo()
    with torch.no_grad():
        acts = unit_acts(model, eval_games, layer, sae.encode if sae is not None else None)
    half = len(eval_games) // 2
    cut = {"max_chars": s.max_chars, "max_positions": 20}
    table_a = bsp_table(eval_games[:half], ["board"], **cut)
    table_b = bsp_table(eval_games[half:], ["board"], **cut)
    a, b = table_a.gather(acts[:half]), table_b.gather(acts[half:])
    cover = bsp_coverage(torch.cat([a, b]), torch.cat([table_a.values, table_b.values]))
    recon = board_reconstruction(a, table_a.values, b, table_b.values)
    moved = table_a.columns("board", drop_start=True)  # without the starting position's (piece, square) pairs
    recon_moved = board_reconstruction(a, table_a.values[:, moved], b, table_b.values[:, moved])
    l0 = float((torch.cat([a, b]) > 0).sum(1).float().mean())
    return {"name": name, "val_loss": round(val_loss, 4), "legal_move_rate": round(legal.rate, 4), "legal": legal.legal,
            "legal_total": legal.total, "coverage": round(cover.mean, 4), "coverage_present": round(cover.mean_present, 4),
            "coverage_threshold": cover.threshold, "reconstruction": round(recon.score, 4),
            "reconstruction_micro_f1": round(recon.micro_f1, 4), "reconstruction_threshold": recon.threshold,
            "reconstruction_no_start": round(recon_moved.score, 4),
            "units": int(a.shape[1]), "l0": round(l0, 2), "positions": int(a.shape[0] + b.shape[0])}


def evaluate_all(out: Path, s: CompareSettings, stream: torch.Tensor, eval_games: list[str], progress: bool,
                 only: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    _, val_part = split_stream(stream, N_CHARS + 1, s.seq_len, TrainSettings().val_fraction)
    results = {}
    for name in only:
        path = out / "runs" / name / "eval.json"
        if path.exists():
            results[name] = read_json(path)
            continue
        began = time.time()
        if name == "sae":
            from ..dictionaries import fileformat
            res = evaluate(name, load_lm(out / "runs" / "dense_gelu"), s, eval_games, val_part,
                           sae=fileformat.load(out / "runs" / "sae" / "sae").eval())
        else:
            res = evaluate(name, load_lm(out / "runs" / name), s, eval_games, val_part)
        res["eval_s"] = round(time.time() - began, 1)
        atomic_write_json(path, res)
        results[name] = res
        _log(f"{name}: coverage {res['coverage']:.3f}, reconstruction {res['reconstruction']:.3f}, legal "
             f"{res['legal_move_rate']:.3f}, L0 {res['l0']:.1f} ({res['eval_s']} s)", progress)
    return results


# --- the driver --------------------------------------------------------------------------------------

def compare(out_dir: str | Path, settings: CompareSettings, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole comparison in ``out_dir``; returns what results.json holds (module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    train_games, eval_games = datasets(out, settings, progress)
    stream = token_stream(train_games)
    p = plan(out, settings, stream, progress)
    steps = p["steps"]
    train_models(out, settings, stream, steps, progress)
    results = evaluate_all(out, settings, stream, eval_games, progress, MODELS)
    k = settings.sae_k or max(1, round(results["moex"]["l0"]))
    sae_info = train_sae(out, settings, stream, k, progress)
    results.update(evaluate_all(out, settings, stream, eval_games, progress, ("sae",)))
    rows = []
    for name in ENTRIES:
        run = out / "runs" / name
        row = dict(results[name])
        if name == "sae":
            row.update(train_steps=sae_info["steps"], train_wall_s=sae_info["wall_s"], sae_k=sae_info["k"],
                       sae_latents=sae_info["n_latents"], sae_fvu_train=sae_info["fvu_train"])
        else:
            summary = read_json(run / "summary.json")
            wall = read_json(run / "wall.json")["seconds"] if (run / "wall.json").exists() else None
            row.update(train_steps=summary["steps"], train_tokens=summary["tokens"], train_wall_s=wall,
                       train_loss=round(summary["train_loss"], 4), activated_params=summary["params"]["activated"],
                       activated_mlp_params=summary["params"]["activated_mlp"], total_params=summary["params"]["total"])
        row["paper"] = PAPER[name]
        rows.append(row)
    doc = {"settings": asdict(settings), "steps": steps, "tokens_per_model": p["tokens_per_model"],
           "moex_seconds_per_step": p["moex_seconds_per_step"], "layer": settings.layer_index,
           "site": f"mlp_hidden.{settings.layer_index}", "threads": torch.get_num_threads(),
           "train_chars": int(stream.numel()), "eval_games": len(eval_games), "models": rows}
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", markdown(doc))
    return doc


def _f(v: Any, nd: int = 3) -> str:
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = ["# MoE-X comparison on chess (featurekit moex compare)", "",
             f"d_model {s['d_model']}, {s['n_layer']} layers, seq_len {s['seq_len']}, {s['n_experts']} experts top-{s['top_k']}; "
             f"{doc['steps']} steps × {s['batch_size']} × {s['seq_len']} = {doc['tokens_per_model']:,} tokens per model; "
             f"{s['games']} training games ({doc['train_chars']:,} characters), {doc['eval_games']} evaluation games; "
             f"units of `{doc['site']}`; {doc['threads']} thread(s).", "",
             "| model | val loss | legal moves | coverage | reconstruction | rec. w/o start squares | units | L0 | train s | "
             "paper cov. / rec. (source) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["models"]:
        paper = r["paper"]
        ref = f"{paper['coverage']:.3f} / {paper['reconstruction']:.3f} ({paper['source']})" if paper else "— (Fig. 3 only)"
        name = r["name"] + (f" (TopK k={r['sae_k']}, spliced)" if r["name"] == "sae" else "")
        lines.append(f"| {name} | {_f(r['val_loss'])} | {_f(r['legal_move_rate'])} ({r['legal']}/{r['legal_total']}) | "
                     f"{_f(r['coverage'])} | {_f(r['reconstruction'])} | {_f(r['reconstruction_no_start'])} | {r['units']} | "
                     f"{_f(r['l0'], 1)} | "
                     f"{_f(r.get('train_wall_s'), 0)} | {ref} |")
    lines += ["", "Coverage and reconstruction: Karvonen et al.'s metrics on the `board` properties (piece on square) at the "
              "`.` positions; reconstruction labels from the first half of the evaluation games, scored on the second; "
              "'w/o start squares' leaves out the 32 (piece, square) pairs of the starting position, as one version of "
              "their code does. L0: mean nonzero units per evaluated position. Paper: Yang et al. 2025, chess, equal activated "
              "parameters (val loss there is on real games).", ""]
    return "\n".join(lines)
