"""Before any work: the resolved config, checks that need no model weights, the run folder, the
model, and the packed contexts every step reads.

Order of a new run (`start`): resolve the config → check the text and the site (no weights loaded)
→ the run folder holds no other config's run (or `--overwrite` empties it) → stale temporary files
swept → config.json written. A check that fails leaves nothing behind.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from pathlib import Path

import torch

from .. import rundir
from .._io import atomic_write_json, read_json
from ..config import RunConfig, from_dict, validate
from ..config.schema import ImagesConfig
from ..data.harvest import choose_dtype
from ..data.sources import TEST_FRACTION, is_test_document, load_texts, source_digest
from ..data.tokens import pack, token_mask
from ..dictionaries import METHODS
from ..errors import FeaturekitError
from ..models import load_model
from ..models.loading import LoadedModel
from ..models.sites import parse_site, site_dim
from ..train.distributed import train_device

MIN_EVAL_TOKENS = 4096  # fewer held-out tokens than this: the metrics are noisy, and the run says so
DOCUMENTS_HELP = ("a .txt file's documents are separated by blank lines; a folder holds one document per .txt file; "
                  ".jsonl/.parquet one per row of the `text` column")


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the config's automatic values so the saved config.json states every number; local model
    and text paths become absolute, so the run folder works from any current folder."""
    cfg = copy.deepcopy(cfg)
    validate(cfg)
    train_device(cfg.train.device)  # a device that is not there fails now, not after the harvest
    site = parse_site(cfg.site)  # bad syntax fails before anything is written
    if cfg.dictionary.method == "clt":
        raise FeaturekitError("dictionary.method=clt (cross-layer transcoder) reads the MLP inputs of many layers at once, "
                              "not one site: train it with `featurekit circuits train-set --method clt OUT_DIR`")
    if METHODS[cfg.dictionary.method].transcodes and cfg.output_site is None:
        if site.kind != "mlp_in":
            raise FeaturekitError(f"dictionary.method={cfg.dictionary.method} predicts one site from another: with site={cfg.site} "
                                  f"set output_site too (e.g. site=mlp_in.{site.layer} output_site=mlp_out.{site.layer})")
        cfg.output_site = f"mlp_out.{site.layer}"  # a transcoder replaces the MLP of its layer
    if cfg.output_site is not None:
        parse_site(cfg.output_site)
    total = cfg.train.epochs * cfg.data.train_tokens
    if cfg.train.dead_tokens is None:
        cfg.train.dead_tokens = max(cfg.train.batch_size, min(10_000_000, total // 4))
    cfg.model.name = _absolute(cfg.model.name)
    if is_vision(cfg):
        from .vision import resolve_images

        resolve_images(cfg)  # image sources made absolute; the preprocessing filled from the model
    else:
        cfg.data.source = _absolute(cfg.data.source)
    return cfg


def is_vision(cfg: RunConfig) -> bool:
    """Whether the run's model is a vision model (then the data are images: `pipeline.vision`)."""
    from ..vision.models import is_vision_model

    return is_vision_model(cfg.model.name)


def data_digest(cfg: RunConfig) -> str:
    """The content digest of the run's data: its text, or its images (name, size and pixels of each)."""
    if is_vision(cfg):
        from ..vision.images import images_digest, load_images

        return images_digest(load_images(cfg.data.source))
    return source_digest(cfg.data.source)


def _absolute(name: str) -> str:
    """An existing local path as an absolute path; anything else (embedded or Hub names) unchanged."""
    path = Path(name).expanduser()
    return str(path.resolve()) if not name.startswith("hf:") and path.exists() else name


def save_config(cfg: RunConfig) -> None:
    atomic_write_json(cfg.run_dir / "config.json", cfg.to_dict())


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config of the run in `run_dir`, pointed at that folder (wherever it lies, whatever its name)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        hint = " (it does not exist)" if not run_dir.exists() else ""
        raise FeaturekitError(f"{run_dir} is not a featurekit run folder{hint}: config.json is missing; pass the folder "
                              f"that `featurekit run` or `featurekit train` wrote (runs/NAME)")
    data = read_json(path)
    if not isinstance(data, dict):
        raise FeaturekitError(f"{path} must hold a JSON object (a run's resolved config); the file is damaged")
    try:
        cfg = from_dict(RunConfig, data)
    except FeaturekitError as err:
        raise FeaturekitError(f"{path}: {err}") from err
    cfg.out_dir, cfg.name = str(run_dir.parent), run_dir.name
    return cfg


def config_digest(cfg: RunConfig) -> str:
    """sha256 of everything in the config that shapes the dictionary (not where the run lies, not eval or report)."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in ("name", "out_dir", "eval", "report", "features")}
    if data.get("images") == dataclasses.asdict(ImagesConfig()):
        del data["images"]  # a text run: its digest stays what it was before vision runs existed
    return hashlib.sha256(repr(sorted(_flat(data).items())).encode()).hexdigest()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# -- checks before any weights load ------------------------------------------------------------------
def check_text(cfg: RunConfig) -> None:
    """The text source exists, holds text, and gives both a training and a held-out split (no model needed)."""
    docs = load_texts(cfg.data.source, "all")  # a missing or empty source fails here
    if cfg.data.holdout == "contexts":
        return  # the contexts are split once packed (`contexts`); a source of one document is fine
    n_test = sum(is_test_document(d) for d in docs)
    if n_test == 0 or n_test == len(docs):
        side = "held-out (test)" if n_test == 0 else "training"
        raise FeaturekitError(
            f"text source {cfg.data.source!r} has {len(docs)} document(s) and none of them falls in the {side} split: documents "
            f"are held out whole, {TEST_FRACTION:.0%} of them chosen by a hash of their text ({DOCUMENTS_HELP}). Split the text "
            f"into more documents, or set data.holdout=contexts to hold out {TEST_FRACTION:.0%} of the packed contexts instead")


def check_site(cfg: RunConfig) -> None:
    """The sites exist in the model, judged from its config alone (weights are not read)."""
    from ..models.loading import load_model_config
    from ..models.sites import check_site as check

    config = load_model_config(cfg.model.name)
    if config is not None:
        for site in harvest_sites(cfg):
            check(config, site)


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no model weights: the text (or images) and the sites."""
    if is_vision(cfg):
        from .vision import preflight_images

        return preflight_images(cfg)
    check_text(cfg)
    check_site(cfg)


def start(cfg: RunConfig, overwrite: bool = False) -> None:
    """Begin or continue the run in cfg.run_dir once the checks passed (module docstring): the folder holds
    no other config's run (`overwrite` empties it), stale temporary files go, config.json is written.
    Under torchrun only rank 0 touches the folder."""
    if rundir.rank() != 0:
        return
    rundir.check_config(cfg.run_dir, cfg.to_dict(), overwrite, normalize=lambda old: from_dict(RunConfig, old).to_dict())
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    rundir.sweep(cfg.run_dir)
    save_config(cfg)


def eval_split_warning(cfg: RunConfig, split: str, ids: torch.Tensor, mask: torch.Tensor) -> str | None:
    """A warning when the evaluation contexts hold fewer than MIN_EVAL_TOKENS tokens (None otherwise)."""
    kept = int(mask.sum())
    if kept >= MIN_EVAL_TOKENS:
        return None
    return (f"the evaluation set of {cfg.data.source!r} ({split} split) holds only {kept} tokens in {len(ids)} context(s) "
            f"(eval.tokens={cfg.eval.tokens}): FVU, CE and KL from fewer than {MIN_EVAL_TOKENS} tokens are noisy; give more "
            f"text or a larger eval.tokens, or set data.holdout=contexts")


# -- the model and its contexts ----------------------------------------------------------------------
def open_model(cfg: RunConfig) -> LoadedModel:
    """Load the configured model (a vision run: a `vision.models.VisionModel`) and check that the configured
    site exists in it."""
    dtype = choose_dtype(cfg.model.dtype, cfg.model.device)
    if is_vision(cfg):
        from ..vision.models import load_vision_model

        loaded = load_vision_model(cfg.model.name, dtype=dtype, device=cfg.model.device)
    else:
        loaded = load_model(cfg.model.name, dtype=dtype, device=cfg.model.device)
    for site in harvest_sites(cfg):
        site_dim(loaded.model, site)  # an unknown site fails here, listing the valid ones
    return loaded


def harvest_sites(cfg: RunConfig) -> list[str]:
    """The sites one forward pass captures: `site`, and a transcoder's `output_site` beside it."""
    return [cfg.site] + ([cfg.output_site] if cfg.output_site else [])


def contexts(loaded: LoadedModel, cfg: RunConfig, split: str, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed contexts of `split` ("train", "test" or "all") and their token mask, cut so the mask keeps
    at most n_tokens. With data.holdout=contexts the whole source is packed and the contexts are split
    (`held_out_contexts`); otherwise the documents of the split are packed."""
    per_context = max(1, cfg.data.context_len - 1)
    max_contexts = math.ceil(1.05 * n_tokens / per_context) + 1
    if cfg.data.holdout == "contexts" and split != "all":
        ids = pack(load_texts(cfg.data.source, "all"), loaded.tokenizer, cfg.data.context_len)
        test = held_out_contexts(ids)
        ids = ids[test if split == "test" else ~test][:max_contexts]
        if len(ids) == 0:
            raise FeaturekitError(f"text source {cfg.data.source!r} fills only {len(test)} context(s) of {cfg.data.context_len} "
                                  f"tokens, too few to hold one out: give more text or a smaller data.context_len")
    else:
        ids = pack(load_texts(cfg.data.source, split), loaded.tokenizer, cfg.data.context_len, max_contexts=max_contexts)
    mask = token_mask(ids, loaded.tokenizer, exclude_first=cfg.data.exclude_first, exclude_special=cfg.data.exclude_special)
    over = mask.flatten().cumsum(0) > n_tokens
    mask = mask & ~over.view_as(mask)
    used = int(mask.any(1).nonzero().max()) + 1 if mask.any() else 0
    return ids[:used], mask[:used]


def held_out_contexts(ids: torch.Tensor) -> torch.Tensor:
    """Which packed contexts are held out under data.holdout=contexts: the ⌈TEST_FRACTION · N⌉ contexts
    (at least one, none of a single context) with the smallest sha256 of their token ids. Depends only on
    the contexts' content, so the split is the same every time the same text is packed the same way."""
    n = len(ids)
    keys = [hashlib.sha256(row.numpy().tobytes()).digest() for row in ids]
    n_test = min(max(1, math.ceil(TEST_FRACTION * n)), n - 1)
    test = torch.zeros(n, dtype=torch.bool)
    test[sorted(range(n), key=keys.__getitem__)[:max(n_test, 0)]] = True
    return test


def token_policy(cfg: RunConfig) -> dict:
    return {"exclude_first": cfg.data.exclude_first, "exclude_special": cfg.data.exclude_special,
            "max_norm_multiple": cfg.data.max_norm_multiple}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_run_json(path: Path) -> dict | None:
    """A JSON object the run wrote, or None when it is missing or unreadable."""
    try:
        data = read_json(path)
    except (OSError, ValueError, FeaturekitError):
        return None
    return data if isinstance(data, dict) else None

