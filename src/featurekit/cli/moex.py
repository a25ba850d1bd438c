"""featurekit moex: small LMs whose MLP is dense, Switch-style MoE or MoE-X (docs/moex.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _moex_parser(sub)


def _moex_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit moex train`: a small LM with dense, Switch or MoE-X MLPs on a token stream (docs/moex.md)."""
    moex = sub.add_parser("moex", help="MoE-X: train small LMs whose MLP is dense, Switch-style MoE or MoE-X (docs/moex.md)")
    p = moex.add_subparsers(dest="moex", required=True).add_parser(
        "train", help="train (or resume) a small GPT-style LM in RUN_DIR",
        description="Train a small GPT-style LM whose MLPs are dense GELU/ReLU, Switch-style top-k MoE or MoE-X (ReLU experts, "
                    "sparsity-aware router), every kind at the same activated MLP parameters. Checkpoints let a killed run "
                    "continue: run the same command again. RUN_DIR gets config.json, checkpoint/, metrics.jsonl, "
                    "model.safetensors + model.json, summary.json.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder (created; the same command resumes it)")
    p.add_argument("--data", type=Path, required=True,
                   help="a text file (every character a token, e.g. PGN games) or a .safetensors file with 'tokens' and 'vocab_size'")
    p.add_argument("--kind", choices=("dense_gelu", "dense_relu", "switch", "moex"), default="moex", help="the MLP (default moex)")
    p.add_argument("--upcycle-from", type=Path, metavar="DENSE_RUN_DIR",
                   help="start the MoE-X experts as copies of this finished dense_relu run's MLPs (needs --expert-hidden = its hidden)")
    for flag, default, what in [("--d-model", 64, "width of the residual stream"), ("--n-layer", 2, "blocks"),
                                ("--n-head", 4, "attention heads"), ("--seq-len", 128, "context length in tokens"),
                                ("--mlp-hidden", 0, "dense MLP width H (0: 4 × d_model)"), ("--n-experts", 8, "experts M"),
                                ("--top-k", 1, "experts per token k"),
                                ("--expert-hidden", 0, "expert width D (0: H / k, equal activated parameters)"),
                                ("--steps", 1000, "optimiser steps"), ("--batch-size", 32, "sequences per step"),
                                ("--checkpoint-every", 100, "steps between checkpoints"), ("--seed", 0, "seed of init and batches"),
                                ("--threads", 0, "torch CPU threads (0: torch's default)")]:
        p.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--aux-weight", type=float, default=0.01, help="weight of the load-balancing loss (default 0.01)")
    p.add_argument("--router-estimate", choices=("expert", "unit"), default="expert",
                   help="MoE-X's estimate of each expert's active units: one Gaussian per expert (default) or per unit")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a run of another config in RUN_DIR (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _moex_train(args: argparse.Namespace, progress: bool) -> int:
    import torch

    from ..moex.lm import LMConfig
    from ..moex.stream import read_stream
    from ..moex.train import TrainSettings, train_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    tokens, vocab_size, vocab = read_stream(args.data)
    lm = LMConfig(vocab_size=vocab_size, mlp=args.kind, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                  seq_len=args.seq_len, mlp_hidden=args.mlp_hidden, n_experts=args.n_experts, top_k=args.top_k,
                  expert_hidden=args.expert_hidden, aux_weight=args.aux_weight, router_estimate=args.router_estimate)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every,
                             seed=args.seed)
    summary = train_lm(args.run_dir, tokens, lm, settings, upcycle_from=args.upcycle_from, vocab=vocab,
                       overwrite=args.overwrite, progress=progress, device=args.device)
    print(f"{summary['mlp']}: {summary['steps']} steps, train loss {summary['train_loss']:.4f}, validation loss "
          f"{summary['val_loss']:.4f} nats/token; {summary['params']['activated']:,} activated of {summary['params']['total']:,} "
          f"parameters -> {args.run_dir}")
    return 0


HANDLERS = {"moex": _moex_train}
