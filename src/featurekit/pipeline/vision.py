"""Vision runs: the steps of `featurekit run` where the model is a vision transformer and the data are images.

The job dispatches here on the model (`setup.is_vision`); everything downstream of the activations is the
text pipeline's own: the activation cache, every dictionary method's trainer or fitter, the saved
dictionary, the reconstruction metrics and the report. What differs:

* data: `vision.images` sources; the held-out split holds out whole images; training takes seeded views
  of the training images (view 0 plain, later ones random crops/flips) until data.train_tokens tokens,
  the evaluation views of the held-out images (seed + 1) until eval.tokens;
* harvest: `vision.harvest` (each row's token kind, CLS or patch, is kept in the cache's token_ids); with
  data.cache=false the training views are harvested again on every pass (`training.TrainingData.views`);
* evaluation: FVU, L0, dead/dense as for text, the share of each latent's firings on CLS and on patch
  tokens (features/token_kinds.json, eval.json's cls_only/patch_only counts), the top (image, token) of
  report.n_features latents (features/top_patches.json), and the vision splice (`vision.splice`):
  cos of the final CLS embedding and relative change of the final patch tokens, clean vs spliced; the same on
  other images with `featurekit eval RUN --images SOURCE` (→ RUN_DIR/evals/LABEL/);
* the feature store: `vision_features.py`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .._io import atomic_write_json, sha256_file
from ..config import RunConfig
from ..data.cache import ActivationCache, write_cache
from ..dictionaries import METHODS, load
from ..errors import FeaturekitError, note, warn
from ..evaluate.splice import reconstruction_eval
from ..features.examples import FeatureStats, choose_latents, write_features
from ..report import write_report
from ..vision.harvest import CLS, harvest_views, token_mask
from ..vision.images import Preprocess, Views, load_images, make_views, split_images
from ..vision.models import VisionModel, preprocess_of, vision_config
from .setup import dtype_name, harvest_sites, read_run_json, start


def resolve_images(cfg: RunConfig) -> None:
    """Local image folders as absolute paths; images.size/mean/std filled from the model where null (no weights read)."""
    parts = [part.strip() for part in str(cfg.data.source).split("+")]
    cfg.data.source = "+".join(str(Path(p).expanduser().resolve()) if Path(p).expanduser().is_dir() else p for p in parts)
    model_pre = preprocess_of(cfg.model.name)
    im = cfg.images
    im.size = im.size or model_pre["size"]
    im.mean = [float(v) for v in (im.mean or model_pre["mean"])]
    im.std = [float(v) for v in (im.std or model_pre["std"])]
    preprocess(cfg)  # bad values fail now


def preprocess(cfg: RunConfig) -> Preprocess:
    im = cfg.images
    return Preprocess(int(im.size), tuple(im.mean), tuple(im.std), im.crop, float(im.scale_min), bool(im.flip))


def preflight_images(cfg: RunConfig) -> None:
    """Checks before any weights load: the settings a vision run can take, the images (both splits non-empty),
    the input size against the patch size, and the sites against the model's config."""
    from ..models.sites import check_site

    if cfg.data.gradients or METHODS[cfg.dictionary.method].needs_gradient:
        raise FeaturekitError(f"dictionary.method={cfg.dictionary.method} / data.gradients need a language-model loss; a vision "
                              f"model has none: use another method (topk, batchtopk, relu, jumprelu, ...)")
    if cfg.images.tokens not in ("all", "patches", "cls"):
        raise FeaturekitError(f"images.tokens={cfg.images.tokens!r}: use all (CLS and patches), patches or cls")
    images = load_images(cfg.data.source)
    split_images(images, "test")  # fewer than two images fail here
    config = vision_config(cfg.model.name)
    if cfg.images.size % int(config.patch_size):
        raise FeaturekitError(f"images.size={cfg.images.size} is not a multiple of the model's patch size {config.patch_size}: "
                              f"use e.g. {cfg.images.size // config.patch_size * config.patch_size}")
    for site in harvest_sites(cfg):
        check_site(config, site)


def views(cfg: RunConfig, vm: VisionModel, split: str, n_tokens: int) -> Views:
    """Views of the split's images holding n_tokens kept tokens (training and all: seed train.seed; held out: +1)."""
    keep = token_mask(vm, cfg.images.size, cfg.images.tokens)
    images = split_images(load_images(cfg.data.source), split)
    return make_views(images, preprocess(cfg), n_tokens, int(keep.sum()), seed=cfg.train.seed + (split == "test"))


def run_image_harvest(cfg: RunConfig, vm: VisionModel | None = None, progress: bool = True) -> ActivationCache:
    """Harvest the training views into runs/NAME/activations (resumable; a cache of other images, weights or settings is refused)."""
    from .setup import open_model
    from .training import harvest_meta, loaded_identity, mismatch

    vm = vm or open_model(cfg)
    meta = {**harvest_meta(cfg), **loaded_identity(vm)}
    folder = cfg.run_dir / "activations"
    if (folder / "manifest.json").is_file():
        error = mismatch(f"the activation cache in {folder}", ActivationCache(folder).meta, meta)
        if error:
            raise error
    stream = harvest_views(vm, views(cfg, vm, "train", cfg.data.train_tokens), harvest_sites(cfg),
                           batch_size=cfg.data.harvest_batch, tokens=cfg.images.tokens, progress=progress)
    return write_cache(folder, stream, meta, cfg.data.shard_tokens)


def run_image_eval(cfg: RunConfig, vm: VisionModel | None = None, progress: bool = True, split: str = "test",
                   out_dir: Path | None = None) -> dict:
    """Reconstruction metrics, token-kind shares, top patches and the vision splice on `split` of cfg.data.source's
    images (the run's own: the held-out ones; `featurekit eval --images` on others: all, written to out_dir) →
    OUT/eval.json and OUT/features/ (module docstring)."""
    from ..vision.splice import vision_splice_eval
    from .setup import open_model

    out = Path(out_dir or cfg.run_dir)
    weights = cfg.run_dir / "dictionary" / "model.safetensors"
    if not weights.is_file():
        raise FeaturekitError(f"{cfg.run_dir} has no trained dictionary yet: run `featurekit run` first")
    vm = vm or open_model(cfg)
    sae = load(cfg.run_dir / "dictionary", device=next(vm.model.parameters()).device)
    if sae.metadata.get("source", {}).get("site") != cfg.site:
        raise FeaturekitError(f"the dictionary in {out / 'dictionary'} was trained on {sae.metadata.get('source', {}).get('site')}, "
                              f"not {cfg.site}; evaluate it with the config it was trained with")
    test = views(cfg, vm, split, cfg.eval.tokens)
    stats = FeatureStats(sae.n_latents, top_n=cfg.report.top_n)
    fires = {"cls": torch.zeros(sae.n_latents, dtype=torch.long), "patch": torch.zeros(sae.n_latents, dtype=torch.long)}
    counts = {"cls": 0, "patch": 0}
    current = []

    def batches():
        for batch in harvest_views(vm, test, [cfg.site], batch_size=cfg.eval.batch_contexts, tokens=cfg.images.tokens,
                                   progress=progress):
            current[:] = [batch]
            yield batch.acts[cfg.site]

    def on_codes(codes: torch.Tensor) -> None:
        batch = current[0]
        stats.update(codes, batch.context_idx, batch.position)
        is_cls = (batch.token_ids == CLS).to(codes.device)
        for kind, rows in (("cls", is_cls), ("patch", ~is_cls)):
            fires[kind] += (codes[rows] != 0).sum(0).cpu()
            counts[kind] += int(rows.sum())

    recon = reconstruction_eval(sae, batches(), on_codes=on_codes)
    recon.pop("density")
    bad = [k for k, v in recon.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FeaturekitError(f"the evaluation gave non-finite {', '.join(bad)}: the activations overflow in "
                              f"{dtype_name(vm.model.dtype)} (try model.dtype=float32); nothing was written")
    live = (fires["cls"] + fires["patch"]) > 0
    result = {"site": cfg.site, "model": cfg.model.name, "modality": "vision", "dtype": dtype_name(vm.model.dtype),
              "source": cfg.data.source, "split": split, "images": {"preprocess": preprocess(cfg).to_dict(), "tokens": cfg.images.tokens},
              "held_out_images" if split == "test" else "n_images": len(test.images), "views": test.n_views,
              "dictionary_sha256": sha256_file(weights),
              "evaluations": ["reconstruction", "vision_splice", "features"], **recon,
              "cls_only_features": int((live & (fires["patch"] == 0)).sum()),
              "patch_only_features": int((live & (fires["cls"] == 0)).sum())}
    atomic_write_json(out / "eval.json", result)
    keep = token_mask(vm, cfg.images.size, cfg.images.tokens)
    splice_views = Views(test.images, test.preprocess, min(cfg.eval.splice_contexts, test.n_views), test.seed)
    result.update(vision_splice_eval(vm, sae, cfg.site, splice_views, keep, cfg.eval.batch_contexts, progress))
    atomic_write_json(out / "eval.json", result)
    features = out / "features"
    write_features(features, stats)
    atomic_write_json(features / "token_kinds.json", {"n_cls_tokens": counts["cls"], "n_patch_tokens": counts["patch"],
                                                      "cls_fires": fires["cls"].tolist(), "patch_fires": fires["patch"].tolist()})
    atomic_write_json(features / "top_patches.json", top_patches(stats, choose_latents(stats, cfg.report.n_features, seed=cfg.train.seed),
                                                                 test, vm))
    draw_figures(cfg, vm, sae, test, stats, fires, features)
    result["complete"] = True
    atomic_write_json(out / "eval.json", result)
    return result


def top_patches(stats: FeatureStats, latents: list[int], test: Views, vm: VisionModel) -> list[dict]:
    """Per latent, its top tokens: the view's image, the token's kind and, for a patch, its grid row and column."""
    grid = vm.grid(test.preprocess.size)
    out = []
    for latent in latents:
        tops = []
        for value, view, position in stats.top(latent):
            patch = position - vm.n_prefix
            tops.append({"value": value, "view": view, "image": test.name(view), "token": position,
                         **({"kind": "cls"} if patch < 0 else {"kind": "patch", "row": patch // grid, "col": patch % grid})})
        out.append({"latent": latent, "density": float(stats.density()[latent]), "top": tops})
    return out


def draw_figures(cfg: RunConfig, vm: VisionModel, sae, test: Views, stats: FeatureStats, fires: dict[str, torch.Tensor],
                 features: Path) -> dict:
    """`vision.figures` pictures of a few features, CLS-token and patch features apart → features/figures/*.png and
    features/figures.json {"cls": [{latent, file}], "patch": [...]}: the report.n_features // 4 (at least 1) latents
    firing most often on CLS tokens, and as many of the most frequent patch features; each drawn on the distinct
    held-out views of its top tokens (at most 4)."""
    from ..vision.figures import feature_figure

    per_kind = max(1, cfg.report.n_features // 4)
    density = stats.density()
    cls_fires, patch_fires = fires["cls"], fires["patch"]
    cls_latents = [int(i) for i in cls_fires.argsort(descending=True)[:per_kind] if cls_fires[i] > 0]
    patch_latents = [int(i) for i in patch_fires.argsort(descending=True) if patch_fires[i] > 0 and int(i) not in cls_latents][:per_kind]
    listing: dict[str, list] = {"cls": [], "patch": []}
    for kind, latents in (("cls", cls_latents), ("patch", patch_latents)):
        for latent in latents:
            ids = list(dict.fromkeys(view for _, view, _ in stats.top(latent)))[:4]
            if not ids:
                continue
            name = f"latent_{latent}.png"
            feature_figure(vm, sae, cfg.site, test, latent, ids, features / "figures" / name,
                           title=f"latent {latent} at {cfg.site}: density {float(density[latent]):.4f}, "
                                 f"{int(cls_fires[latent])} CLS firings")
            listing[kind].append({"latent": latent, "file": f"figures/{name}", "density": float(density[latent])})
    atomic_write_json(features / "figures.json", listing)
    return listing


def image_eval_complete(cfg: RunConfig) -> bool:
    result = read_run_json(cfg.run_dir / "eval.json")
    weights = cfg.run_dir / "dictionary" / "model.safetensors"
    return bool(result and result.get("complete") and weights.is_file() and result.get("dictionary_sha256") == sha256_file(weights))


def run_vision(cfg: RunConfig, progress: bool = True, overwrite: bool = False) -> Path:
    """`featurekit run` for a vision model: harvest → train → evaluate → feature store → report, continuing from
    whatever is complete."""
    from .features import store_complete
    from .setup import open_model
    from .training import dictionary_complete, run_train
    from .vision_features import run_image_features

    vm = open_model(cfg)
    start(cfg, overwrite)
    if dictionary_complete(cfg, vm):
        note(f"{cfg.run_dir / 'dictionary'} is this config's finished dictionary on the same images and model: "
             f"harvest and training skipped")
    else:
        if cfg.data.cache:  # else streamed: the training views run through the model on every pass
            run_image_harvest(cfg, vm, progress)
        run_train(cfg, resume=(cfg.run_dir / "checkpoint" / "state.json").is_file(), progress=progress, loaded=vm)
    if image_eval_complete(cfg):
        note(f"{cfg.run_dir / 'eval.json'} already scores this dictionary: evaluation skipped")
    else:
        run_image_eval(cfg, vm, progress)
    if store_complete(cfg):
        note(f"{cfg.run_dir / 'features.sqlite'} already describes this dictionary: feature store skipped")
    else:
        run_image_features(cfg, vm, progress)
    if cfg.eval.tokens < 4096:
        warn(f"eval.tokens={cfg.eval.tokens}: the held-out metrics come from few tokens and are noisy")
    return write_report(cfg.run_dir)
