"""The `featurekit` command line: parses arguments, builds the config, calls the pipeline. One module per command
group (runs, bench, interop, explain, circuits, moex), each with `add_parsers(sub)` and `HANDLERS` (command → handler).

    featurekit run     [--config FILE] [--set key=value ...]    the whole job
    featurekit harvest [--config FILE] [--set key=value ...]    activations → runs/NAME/activations
    featurekit train   [--config FILE] [--set key=value ...]    cache → runs/NAME/dictionary
    featurekit train   --resume RUN_DIR                         continue a killed run exactly
    featurekit eval    RUN_DIR [--text SOURCE] [--set data.*=…]  held-out metrics → eval.json (other text → evals/LABEL/)
                       [--suite core,probing,probing_source,probing_tokens,absorption,steering] [--full]
                       … sparse probing (BBC topics, text source, token classes), absorption, KL-matched steering → evals/*.json
    featurekit features RUN_DIR [--text SOURCE]                 every latent's statistics and examples → features.sqlite
    featurekit serve   RUN_DIR [RUN_DIR ...] [--port N] [--host H] [--graphs G ...]   the explorer (web app; graphs: /g/)
    featurekit report  RUN_DIR                                  → report.html
    featurekit clean   RUN_DIR                                  remove the activation cache and checkpoint of a finished run
    featurekit config  [--methods]                              every config key with its default and meaning
    featurekit mlp-sparsity [--model M] [--layers L ...] [--k K ...]   loss cost of a top-k of the model's MLP neurons
    featurekit bench synthetic [--out DIR] [--quick] [--methods a,b] ...   every method on synthetic ground truth
    featurekit bench frontier  [--out DIR] [--methods a,b] [--ks 16,32] [--suite ...] ... FVU/loss against L0 on the real model
    featurekit itda-match [--model-a M] [--model-b M] [--out DIR] ...   ITDA layer matching (Jaccard of atom labels)
    featurekit export neuronpedia RUN_DIR [--out DIR] [--features a-b,...]   the feature store as Neuronpedia batch JSON
    featurekit export saelens|sparsify RUN_DIR [--out DIR]   the run's dictionary in SAELens / sparsify format
    featurekit import PATH --name NAME [--model M] [--site S]   another library's dictionary as a run folder (eval, features, serve)
    featurekit explain RUN_DIR [--features IDS] [--judge SPEC] [--units U]   explain and score features with a judge LM
    featurekit trace (--set DIR | --transcoders DIR...) --prompt TEXT --out G.json   an attribution graph (circuits)
    featurekit circuits train-set OUT_DIR [--model M] [--layers all|0,2|3-6] [--method transcoder|skiptranscoder|clt]
                                                                a transcoder set (PLT layer by layer, or one CLT)
    featurekit circuits quality SET_DIR [--text SOURCE] [--tokens N] [--out FILE]   every MLP replaced by the set: CE, KL
    featurekit circuits faithfulness (--set DIR | --transcoders DIR...) --prompt TEXT [--target TOK] [--partial-set]
                                                                ablate a graph's top features: predicted vs measured logit change
    featurekit moex train RUN_DIR --data FILE [--kind moex|switch|dense_gelu|dense_relu]   a small LM with MoE-X / baseline MLPs
                                                                (its run folder is then a model: --set model.name=RUN_DIR)
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import FeaturekitError
from . import bench, circuits, explain, interop, moex, runs
from .common import EPILOG

GROUPS = (runs, bench, interop, explain, circuits, moex)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurekit", description="Sparse dictionaries for neural network activations.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"featurekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = False
    try:
        code = _dispatch(args)
        done = True
        return code
    except FeaturekitError as err:
        print(f"featurekit: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file featurekit had to read or write: name it and the cause
        if isinstance(err, TimeoutError):
            print(f"featurekit: error: timed out ({err or 'no reply in time'}): is the machine overloaded?", file=sys.stderr)
            return 2
        where = f" {err.filename}" if err.filename else ""
        print(f"featurekit: error: cannot access{where}: {err.strerror or err or type(err).__name__}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group(sync=done)


def _leave_process_group(sync: bool) -> None:
    """Under torchrun: leave the process group before the interpreter exits. A gloo group left to the
    interpreter's teardown can abort the process ("terminate called without an active exception")
    after a successful run. `sync` (a successful command): after every rank is done (a barrier)."""
    distributed = sys.modules.get("featurekit.train.distributed")
    if distributed is not None:
        distributed.destroy(sync=sync)


def _dispatch(args: argparse.Namespace) -> int:
    progress = not getattr(args, "quiet", False)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    handlers = {name: handler for group in GROUPS for name, handler in group.HANDLERS.items()}
    return handlers[args.command](args, progress)
