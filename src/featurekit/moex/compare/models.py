"""Steps 3–4 of the comparison: the five LMs (moex.train run folders) and the TopK SAE on the dense GELU model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_write_json, read_json
from ...models.moexlm.folder import load_lm
from ..chess import VOCAB
from ..train import train_lm
from .settings import MODELS, CompareSettings, say
from .units import harvest


def finished(run: Path, steps: int) -> bool:
    """Whether the run folder holds a finished model trained for ``steps`` steps."""
    summary = run / "summary.json"
    return summary.exists() and (run / "model.safetensors").exists() and read_json(summary).get("steps") == steps


def train_models(out: Path, s: CompareSettings, stream: torch.Tensor, steps: int, progress: bool,
                 device: str = "cpu") -> dict[str, float | None]:
    """Train every LM not yet finished (on ``device``); returns the wall seconds of those trained now (None: skipped)."""
    walls: dict[str, float | None] = {}
    for name in MODELS:
        run = out / "runs" / name
        if finished(run, steps):
            walls[name] = None
            say(f"{name}: finished before, skipped", progress)
            continue
        began = time.time()
        upcycle = out / "runs" / "dense_relu" if name == "moex_upcycled" else None
        summary = train_lm(run, stream, s.lm(name), s.train(steps), upcycle_from=upcycle, vocab=list(VOCAB), progress=progress,
                           device=device)
        walls[name] = round(time.time() - began, 1)
        atomic_write_json(run / "wall.json", {"seconds": walls[name]})
        say(f"{name}: val loss {summary['val_loss']:.4f} in {walls[name]} s", progress)
    return walls



def train_sae(out: Path, s: CompareSettings, stream: torch.Tensor, k: int, progress: bool) -> dict[str, Any]:
    """The TopK SAE on the dense GELU model's layer; skipped when ``runs/sae/sae`` exists with the same k."""
    from ...config.schema import TrainConfig
    from ...dictionaries import fileformat
    from ...dictionaries.topk import TopKSAE
    from ...train import Trainer

    run = out / "runs" / "sae"
    n_latents = s.sae_latents or s.n_experts * s.lm("moex").expert_width
    info_path = run / "sae.json"
    if info_path.exists() and (run / "sae" / "model.safetensors").exists():
        info = read_json(info_path)
        if info.get("k") == k and info.get("n_latents") == n_latents:
            say("sae: finished before, skipped", progress)
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
    say(f"sae: k={k}, {n_latents} latents, FVU {fvu:.3f} on training activations, {info['wall_s']} s", progress)
    return {**info, "wall_s_now": info["wall_s"]}

