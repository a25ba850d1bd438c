"""Other tools' formats: export (neuronpedia, saelens, sparsify) and import."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EPILOG, RUN_DIR_HELP


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _export_parser(sub)
    _import_parser(sub)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit export FORMAT RUN_DIR`: the feature store in other tools' formats."""
    export = sub.add_parser("export", help="write the run's feature store (neuronpedia) or dictionary (saelens, sparsify) in "
                                           "another tool's format")
    formats = export.add_subparsers(dest="format", required=True)
    p = formats.add_parser(
        "neuronpedia", help="the feature store as Neuronpedia / SAEDashboard batch JSON",
        description="Write RUN_DIR/features.sqlite as the JSON files SAEDashboard's neuronpedia-runner writes and "
                    "Neuronpedia imports: batch-N.json (per feature: activation examples with per-token values, logit "
                    "effects, activation histogram, density; top group first, then the quantile bands from the highest), "
                    "skipped_indexes.json (dead or unselected features) and run_settings.json. Fields the store holds "
                    "nothing for (neuron alignment, correlations, the logit histogram) are empty lists; what is "
                    "approximated is listed in docs/neuronpedia.md. Build the store first with `featurekit features RUN_DIR`.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder holding features.sqlite")
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/exports/neuronpedia); earlier batch files there are replaced")
    p.add_argument("--features", metavar="IDS", help="only these features, e.g. 0-99,120,130-140 (default: every live feature)")
    p.add_argument("--batch-size", type=int, default=128, help="features per batch-N.json (default 128, as SAEDashboard)")
    p.add_argument("--model-id", help="Neuronpedia model id (default: the store's model name, lowercased, e.g. gpt2-small)")
    p.add_argument("--layer", type=int, help="layer number (default: the site's layer)")
    p.add_argument("--sae-set", help="Neuronpedia SAE set name (default featurekit-METHOD-SITEKIND, e.g. featurekit-topk-resid-post)")
    p.add_argument("--sae-id-suffix", help="suffix of the Neuronpedia source id (LAYER-SET__SUFFIX); default none")
    p.add_argument("--dataset", help="dataset name recorded per feature (default: the store's text sources)")
    _export_dictionary_parsers(formats)


def _export_dictionary_parsers(formats: argparse._SubParsersAction) -> None:
    """`featurekit export saelens|sparsify RUN_DIR`: the run's dictionary in another library's format (interop)."""
    p = formats.add_parser(
        "saelens", help="the run's dictionary as a SAELens folder (cfg.json + sae_weights.safetensors)",
        description="Write RUN_DIR/dictionary as the folder SAELens's SAE.load_from_disk reads: cfg.json + "
                    "sae_weights.safetensors, normalisation folded into the weights. relu → standard, topk/abstopk → topk/"
                    "abstopk, jumprelu → jumprelu, batchtopk/matryoshka → jumprelu with the global threshold per latent (as "
                    "SAELens saves its own BatchTopK). Other methods (transcoders, MP-SAE, ITDA, SNMF, Feature/Mutual Choice, "
                    "...) stop with an error saying why and what works instead. docs/interop.md has the mapping.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/exports/saelens)")
    p = formats.add_parser(
        "sparsify", help="the run's dictionary as an EleutherAI sparsify hookpoint folder (cfg.json + sae.safetensors)",
        description="Write RUN_DIR/dictionary as the folder sparsify's SparseCoder.load_from_disk reads, under OUT/HOOKPOINT "
                    "(layers.L for resid_post.L, layers.L.mlp for mlp_out.L or an mlp_in.L → mlp_out.L transcoder). topk → "
                    "SAE, transcoder / skiptranscoder → transcode (skip_connection); other methods stop with an error saying "
                    "why and what works instead. docs/interop.md has the mapping.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=RUN_DIR_HELP)
    p.add_argument("--out", type=Path, help="output folder (default RUN_DIR/exports/sparsify)")


def _export(args: argparse.Namespace) -> int:
    if args.format in ("saelens", "sparsify"):
        return _export_dictionary(args)
    from .. import rundir
    from ..features.export import export_neuronpedia, parse_features
    from ..features.store import FeatureStore

    store = FeatureStore(args.run_dir)  # no store: a clear error, nothing written
    out = args.out or args.run_dir / "exports" / "neuronpedia"
    features = parse_features(args.features, store.n_latents) if args.features else None
    with rundir.locked(args.run_dir, f"export neuronpedia {args.run_dir}"):
        files = export_neuronpedia(store, out, features=features, batch_size=args.batch_size, model_id=args.model_id,
                                   layer=args.layer, sae_set=args.sae_set, sae_id_suffix=args.sae_id_suffix,
                                   dataset=args.dataset)
    batches = [f for f in files if f.name.startswith("batch-")]
    print(f"neuronpedia export: {len(batches)} batch file(s) and {len(files) - len(batches)} metadata file(s) in {out}")
    return 0


def _export_dictionary(args: argparse.Namespace) -> int:
    from .. import rundir
    from ..dictionaries import load
    from ..interop import export

    sae = load(args.run_dir / "dictionary")
    out = args.out or args.run_dir / "exports" / args.format
    with rundir.locked(args.run_dir, f"export {args.format} {args.run_dir}"):
        folder = export(sae, args.format, out)
    print(f"{args.format} export: {sae.method} dictionary ({sae.d_in} → {sae.n_latents}) in {folder}")
    return 0


def _import_parser(sub: argparse._SubParsersAction) -> None:
    """`featurekit import PATH`: a dictionary in any format featurekit.load reads, as a run folder (docs/interop.md)."""
    p = sub.add_parser(
        "import", help="another library's dictionary (SAELens, sparsify, Gemma Scope, dictionary_learning) as a run folder",
        description="Read PATH (a SAELens folder, a sparsify hookpoint folder, a Gemma Scope params.npz, a dictionary_learning "
                    "trainer folder, a featurekit dictionary, or hf:ORG/REPO with --subfolder) onto the featurekit method it "
                    "maps to, and write out_dir/NAME/config.json + dictionary/ so that featurekit eval, features, serve, report "
                    "and export work on it. The config names the model and site the file records (or --model / --site) and "
                    "takes --set overrides for the rest (data.source, eval.tokens, ...). docs/interop.md has the mapping.",
        epilog=EPILOG)
    p.add_argument("path", metavar="PATH", help="the dictionary file or folder, or hf:ORG/REPO")
    p.add_argument("--name", required=True, help="run name: the run goes to out_dir/NAME (default runs/NAME)")
    p.add_argument("--model", help="the model the dictionary reads (when the file does not record it, or to point at a local copy)")
    p.add_argument("--site", help="the featurekit site it reads, e.g. resid_post.6 (when the file's hook has no site)")
    p.add_argument("--subfolder", help="a folder inside PATH (or inside the Hub repository)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable), e.g. data.source=FILE")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in out_dir/NAME")


def _import(args: argparse.Namespace) -> int:
    from ..pipeline.importing import import_run

    cfg = import_run(args.path, [*args.overrides, f"name={args.name}"], subfolder=args.subfolder, site=args.site,
                     model=args.model, overwrite=args.overwrite)
    print(f"imported {cfg.dictionary.method} dictionary ({cfg.dictionary.n_latents} latents, {cfg.site} of {cfg.model.name}) "
          f"into {cfg.run_dir}; next: featurekit eval {cfg.run_dir}")
    return 0


HANDLERS = {"export": lambda args, progress: _export(args), "import": lambda args, progress: _import(args)}
