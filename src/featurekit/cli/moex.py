"""featurekit moex: small LMs whose MLP is dense, Switch-style MoE or MoE-X (docs/moex.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _moex_parser(sub)


def _moex_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit moex train`: a small LM with dense, Switch or MoE-X MLPs on a token stream (docs/moex.md)."""
    moex = sub.add_parser("moex", help="MoE-X: train small LMs whose MLP is dense, Switch-style MoE or MoE-X (docs/moex.md)")
    kinds = moex.add_subparsers(dest="moex", required=True)
    _compare_parser(kinds)
    p = kinds.add_parser(
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


def _compare_parser(kinds: argparse._SubParsersAction) -> None:
    """`featurekit moex compare`: the chess comparison of issue 24 (moex/compare.py)."""
    from ..moex.compare import CompareSettings

    p = kinds.add_parser(
        "compare", help="train dense GELU/ReLU, Switch, MoE-X (scratch, upcycled) and an SAE on chess; tabulate their units",
        description="The MoE-X comparison on chess: builds random/greedy legal games (or Stockfish games), trains five small "
                    "LMs at equal activated "
                    "parameters and the same token budget (dense GELU, dense ReLU, Switch, MoE-X from scratch, MoE-X upcycled "
                    "from the dense ReLU run) and a TopK SAE on the dense GELU model's MLP hidden layer, then measures validation "
                    "loss, legal-move rate, BSP coverage and board reconstruction on one layer's units. Writes OUT_DIR/results.json "
                    "and results.md beside the paper's Table 1. Resumable: the same command skips what is finished.")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the comparison folder (data/, runs/, plan.json, results.*)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, default=0, help="optimiser steps per model (the same for all)")
    budget.add_argument("--minutes-per-model", type=float, default=0.0,
                        help="time a few MoE-X steps once and give every model the steps that take MoE-X about this long; "
                             "the step count is recorded in OUT_DIR/plan.json and reused on resume")
    d = CompareSettings.__dataclass_fields__
    for flag, what in [("d_model", "residual width"), ("n_layer", "blocks"), ("n_head", "attention heads"),
                       ("seq_len", "context length"), ("n_experts", "experts M"), ("top_k", "experts per token"),
                       ("batch_size", "sequences per step"), ("checkpoint_every", "steps between checkpoints"),
                       ("games", "training games"), ("eval_games", "held-out games"),
                       ("max_chars", "game length cap in characters (≤ seq_len)"),
                       ("layer", "layer whose units are measured (-1: the last)"),
                       ("legal_prefixes", "held-out prefixes for the legal-move rate"),
                       ("sae_k", "SAE top-k (0: MoE-X's measured L0 at the layer)"),
                       ("sae_latents", "SAE latents (0: MoE-X's unit count)"), ("sae_tokens", "activations to train the SAE on"),
                       ("seed", "seed of data, init and batches")]:
        p.add_argument("--" + flag.replace("_", "-"), type=int, default=d[flag].default, help=f"{what} (default {d[flag].default})")
    p.add_argument("--lr", type=float, default=d["lr"].default, help=f"AdamW learning rate (default {d['lr'].default})")
    p.add_argument("--greedy", type=float, default=d["greedy"].default,
                   help=f"random policy: chance of the one-ply heuristic's move in generated games (default {d['greedy'].default})")
    p.add_argument("--policy", choices=("random", "stockfish"), default=d["policy"].default,
                   help="the games: random (random/greedy legal play; default) or stockfish (Debian's stockfish at varied "
                        "strength, seeded; needs the binary: apt-get install stockfish)")
    p.add_argument("--stockfish-nodes", type=int, default=d["stockfish_nodes"].default,
                   help=f"stockfish policy: engine nodes per move at the strongest level (default {d['stockfish_nodes'].default})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu",
                   help="where the five LMs train: cpu or cuda (default cpu; not part of the plan, so a run may resume on "
                        "another device; the SAE and the metrics run on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _moex_compare(args: argparse.Namespace, progress: bool) -> int:
    import torch

    from ..moex.compare import CompareSettings, compare
    from ..moex.train import training_device

    training_device(args.device)  # a bad or absent device is refused before the games are generated
    torch.set_num_threads(args.threads)
    names = [n for n in CompareSettings.__dataclass_fields__ if hasattr(args, n)]
    settings = CompareSettings(**{n: getattr(args, n) for n in names})
    doc = compare(args.out_dir, settings, progress=progress, device=args.device)
    print((args.out_dir / "results.md").read_text(encoding="utf-8"))
    print(f"{len(doc['models'])} rows -> {args.out_dir / 'results.json'}")
    return 0


def _moex(args: argparse.Namespace, progress: bool) -> int:
    return _moex_compare(args, progress) if args.moex == "compare" else _moex_train(args, progress)


def _moex_train(args: argparse.Namespace, progress: bool) -> int:
    import torch

    from ..models.moexlm.lm import LMConfig
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


HANDLERS = {"moex": _moex}
