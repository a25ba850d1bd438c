"""Round trip through the real libraries: dictionaries trained by featurekit, exported with `featurekit export
saelens|sparsify`'s code, loaded by SAELens / sparsify in their own venvs (benchmarks/peers/setup_venv.sh), whose
encode/decode must equal featurekit's on the same inputs.

    .venv/bin/python benchmarks/interop_roundtrip.py [--out DIR]      # trains, exports, runs each peer, prints errors

A peer whose venv is missing is skipped (printed as such). The peer side runs this same file with the peer's Python
(`--check FORMAT DIR...`), importing only that library, torch and safetensors. Exit status 1 if any error > 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: format → methods exported to it
CASES = {"saelens": ("relu", "topk", "abstopk", "jumprelu", "batchtopk", "matryoshka"),
         "sparsify": ("topk", "transcoder", "skiptranscoder")}
PEER_VENV = {"saelens": "saelens", "sparsify": "sparsify"}
D, F, STEPS = 16, 48, 150


def peers_dir() -> Path:
    env = os.environ.get("FEATUREKIT_BENCH_PEERS_DIR")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "featurekit" / "bench-peers"


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse combinations of 24 directions plus an offset (x), and a linear map of x with noise (y, for transcoders)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(24, D, generator=torch.Generator().manual_seed(0)), dim=1)
    mask = torch.rand(n, 24, generator=gen) < 0.12
    x = (mask * torch.rand(n, 24, generator=gen) * 3) @ dirs + 2.0
    y = x @ torch.randn(D, D, generator=torch.Generator().manual_seed(1)) / 4 + 0.05 * torch.randn(n, D, generator=gen)
    return x, y


def train(method: str, run_dir: Path, steps: int):
    from featurekit.config.schema import TrainConfig
    from featurekit.dictionaries import build
    from featurekit.train.trainer import Trainer

    hyper = {"relu": {"l1_coefficient": 1.0}, "jumprelu": {"l0_coefficient": 0.2}}.get(method, {"k": 4})
    if method == "matryoshka":
        hyper["prefixes"] = [12, 24, F]
    sae = build(method, D, F, seed=0, **hyper)
    trainer = Trainer(sae, TrainConfig(lr=3e-3, warmup_steps=10, log_every=1000, checkpoint_every=10_000, dead_tokens=4096),
                      run_dir, steps)
    x, y = data(2048, 1)
    transcodes = sae.transcodes
    trainer.init_from_data(x, y) if transcodes else trainer.init_from_data(x)
    batches = (data(256, 10 + i) for i in range(steps))
    trainer.fit(((b, t) if transcodes else b for b, t in batches), progress=False)
    return sae.eval()


def featurekit_side(out: Path, steps: int) -> dict[str, Path]:
    """Train, save, export each case; write featurekit's outputs beside each export. Returns format → folder."""
    import featurekit
    from featurekit.interop import export

    torch.manual_seed(0)
    folders = {}
    for fmt, methods in CASES.items():
        for method in methods:
            sae = train(method, out / "runs" / f"{fmt}-{method}", steps)
            sae.metadata = {"source": {"model": "gpt2", "site": "mlp_in.3" if sae.transcodes else "resid_post.3",
                                       **({"output_site": "mlp_out.3"} if sae.transcodes else {})}}
            featurekit.save(sae, out / "runs" / f"{fmt}-{method}" / "dictionary", metadata=dict(sae.metadata))
            sae = featurekit.load(out / "runs" / f"{fmt}-{method}" / "dictionary")
            folder = export(sae, fmt, out / fmt / method)
            x, _ = data(256, 999)
            with torch.no_grad():
                codes = sae.encode(x)
                save_file({"x": x, "codes": codes.contiguous(), "x_hat": sae.reconstruct_from(x, codes).contiguous(),
                           "input_scale": torch.tensor(float(sae.metadata["normalization"]["input_scale"]))},
                          str(folder / "featurekit_outputs.safetensors"))
            folders[f"{fmt}/{method}"] = folder
    return folders


def peer_side(fmt: str, folder: Path) -> dict[str, float]:
    """Run inside the peer's venv: load `folder` with the library, compare with featurekit's outputs."""
    want = load_file(str(folder / "featurekit_outputs.safetensors"))
    x = want["x"]
    with torch.no_grad():
        if fmt == "saelens":
            from sae_lens import SAE

            sae = SAE.load_from_disk(str(folder))
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
        else:
            from sparsify import SparseCoder

            coder = SparseCoder.load_from_disk(folder)
            acts, idx, _ = coder.encode(x)
            codes = torch.zeros(x.shape[0], coder.num_latents).scatter_(-1, idx, acts)
            x_hat = coder.decode(acts, idx) + (x @ coder.W_skip.mT if coder.W_skip is not None else 0)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    return {"codes": rel(codes, want["codes"]), "x_hat": rel(x_hat, want["x_hat"]),
            "same_latents": bool(torch.equal(codes != 0, want["codes"] != 0)), "l0": float((codes != 0).sum(-1).float().mean()),
            "input_scale": float(want["input_scale"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps per dictionary (default {STEPS})")
    p.add_argument("--check", nargs="+", metavar="FORMAT DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.check:
        print(json.dumps([peer_side(args.check[0], Path(folder)) for folder in args.check[1:]]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        folders = featurekit_side(out, args.steps)
        worst, rows = 0.0, []
        for fmt in CASES:  # one peer process per library (importing SAELens takes seconds)
            cases = {case: folder for case, folder in folders.items() if case.startswith(f"{fmt}/")}
            python = peers_dir() / PEER_VENV[fmt] / "bin" / "python"
            if not python.is_file():
                rows += [f"{case:26s} skipped: no {fmt} venv at {python.parent.parent} (benchmarks/peers/setup_venv.sh)" for case in cases]
                continue
            done = subprocess.run([str(python), __file__, "--check", fmt, *map(str, cases.values())], capture_output=True, text=True)
            if done.returncode != 0:
                rows.append(f"{fmt}: FAILED in the peer: {done.stderr.strip().splitlines()[-1:]}")
                worst = float("inf")
                continue
            results = json.loads(done.stdout.strip().splitlines()[-1])
            for case, r in zip(cases, results):
                worst = max(worst, r["codes"], r["x_hat"], 0.0 if r["same_latents"] else float("inf"))
                rows.append(f"{case:26s} codes {r['codes']:.1e}  x_hat {r['x_hat']:.1e}  same latents {r['same_latents']}  "
                            f"L0 {r['l0']:.1f}  trained input_scale {r['input_scale']:.3f}")
        print("\n".join(rows))
        print(f"largest error relative to scale: {worst:.1e}")
        return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
