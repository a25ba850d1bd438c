"""`featurekit run` on a vision model: a tiny random DINOv2 over a folder of random images, end to end, through
the same config, cache, trainer, dictionary file and report as a text run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from featurekit.config import RunConfig, load_config
from featurekit.data.cache import ActivationCache
from featurekit.dictionaries import load
from featurekit.errors import FeaturekitError
from featurekit.features.store import FeatureStore
from featurekit.pipeline import config_digest, dictionary_complete, resolve, run_all
from featurekit.pipeline.vision import preprocess
from featurekit.vision.harvest import CLS, PATCH
from featurekit.vision.images import Preprocess


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (48, 40 + 4 * i, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _overrides(tiny_vits, photos, out, method="topk", extra=()):
    return [f"model.name={tiny_vits['dinov2']}", f"data.source={photos}", "model.dtype=float32", f"out_dir={out}",
            "name=run", "site=resid_post.1", "data.train_tokens=1700", "data.harvest_batch=8", "data.shard_tokens=1000",
            f"dictionary.method={method}", "dictionary.n_latents=64", "train.batch_size=128", "train.epochs=2",
            "train.buffer_tokens=512", "train.warmup_steps=2", "train.threads=1", "eval.tokens=340",
            "eval.splice_contexts=4", "eval.batch_contexts=4", "report.n_features=4", "images.scale_min=0.5",
            "features.tokens=340", "features.batch_contexts=8", *extra]


def test_vision_run_end_to_end(tiny_vits, photos, tmp_path, capsys):
    cfg = load_config(None, _overrides(tiny_vits, photos, tmp_path, extra=["dictionary.k=8"]))
    report = run_all(cfg, progress=False)
    run = tmp_path / "run"
    html = report.read_text()
    assert report == run / "report.html" and "CLS cosine" in html and "Image features" in html and "on patches only" in html
    saved = json.loads((run / "config.json").read_text())
    assert saved["images"]["size"] == 32 and saved["images"]["mean"] == [0.5] * 3  # filled from the model's preprocessor
    result = json.loads((run / "eval.json").read_text())
    assert result["complete"] and result["modality"] == "vision" and result["held_out_images"] == 2
    assert result["n_tokens"] == 340 and result["l0"] == pytest.approx(8.0)
    assert 0 < result["fvu"] < 1.5 and -1 <= result["cls_cosine"] <= 1 and result["patch_rel_change"] >= 0
    assert result["splice_views"] == 4 and result["cls_cosine_zero"] <= 1
    kinds = json.loads((run / "features" / "token_kinds.json").read_text())
    assert kinds["n_cls_tokens"] == 20 and kinds["n_patch_tokens"] == 320
    tops = json.loads((run / "features" / "top_patches.json").read_text())
    assert len(tops) == 4 and all(t["kind"] in ("cls", "patch") for f in tops for t in f["top"])
    figures = json.loads((run / "features" / "figures.json").read_text())
    assert figures["patch"] and all((run / "features" / f["file"]).is_file() for kind in ("cls", "patch") for f in figures[kind])
    assert "Patch features" in html and "data:image/png;base64," in html
    # the cache keeps the token kind of every row
    cache = ActivationCache(run / "activations")
    shard = next(iter(cache.iter_shards(sites=["resid_post.1"])))
    assert set(shard.token_ids.unique().tolist()) == {CLS, PATCH} and cache.n_tokens == 100 * 17
    # the dictionary file states the preprocessing, and it rebuilds the run's transform
    sae = load(run / "dictionary")
    assert Preprocess.from_dict(sae.metadata["images"]) == preprocess(resolve(cfg))
    assert sae.metadata["images"]["tokens"] == "all" and "context_len" not in sae.metadata["source"]
    check_vision_store(run, tops, kinds)
    check_eval_on_other_images(run, tmp_path, capsys)
    # a rerun finds everything done
    assert dictionary_complete(resolve(cfg))
    weights = (run / "dictionary" / "model.safetensors").read_bytes()
    built = (run / "features.sqlite").stat().st_mtime_ns
    run_all(cfg, progress=False)
    assert (run / "dictionary" / "model.safetensors").read_bytes() == weights
    assert (run / "features.sqlite").stat().st_mtime_ns == built  # the store of this dictionary is not rebuilt


def check_eval_on_other_images(run, tmp_path, capsys):
    """`featurekit eval RUN --images FOLDER`: FVU, L0 and the vision splice on every image of another folder, written
    beside the run's own results (its eval.json unchanged)."""
    from featurekit.cli import main

    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (36 + 8 * i, 40, 3), dtype=np.uint8)).save(other / f"o{i}.jpg")
    own = (run / "eval.json").read_bytes()
    assert main(["eval", str(run), "--images", str(other), "--set", "eval.tokens=170", "--set", "eval.splice_contexts=2"]) == 0
    assert f"results: {run / 'evals' / 'other-all' / 'eval.json'}" in capsys.readouterr().out
    result = json.loads((run / "evals" / "other-all" / "eval.json").read_text())
    assert result["complete"] and result["split"] == "all" and result["n_images"] == 3 and result["views"] == 10
    assert result["n_tokens"] == 170 and result["l0"] == pytest.approx(8.0) and 0 < result["fvu"] < 2
    assert result["splice_views"] == 2 and -1 <= result["cls_cosine"] <= 1 and result["source"] == str(other)
    assert (run / "evals" / "other-all" / "features" / "top_patches.json").is_file()
    assert (run / "eval.json").read_bytes() == own


def check_vision_store(run, tops, kinds):
    """The store of a vision run: a row for every latent, CLS and patch firings apart (as token_kinds.json counts
    them on the same held-out views), top examples as (view, token) matching top_patches.json."""
    store = FeatureStore(run / "features.sqlite")
    try:
        meta = store.meta
        assert meta["modality"] == "vision" and meta["n_views"] == 20 and meta["grid"] == 4 and meta["n_prefix"] == 1
        assert store.n_latents == 64 and store.count_features() == 64 and meta["logit_effects"] is False
        for f in range(64):
            page = store.feature(f)
            extra = page["extra"]
            assert (extra["cls_fires"], extra["patch_fires"]) == (kinds["cls_fires"][f], kinds["patch_fires"][f])
            assert page["fires"] == extra["cls_fires"] + extra["patch_fires"]
            counts = {store.token_texts([t])[t]: c for t, c, _ in page["top_tokens"] or []}
            assert counts.get("CLS", 0) == extra["cls_fires"] and counts.get("patch", 0) == extra["patch_fires"]
            for e in page["examples"].get("top", []):
                assert 0 <= e["context"] < 20 and 0 <= e["position"] < 17
                assert e["tokens"][e["position"]] == ("CLS" if e["position"] == 0 else "patch")
                assert e["acts"][e["position"]] == pytest.approx(e["value"])
        for f in tops:  # the same views as the evaluation's: the same top examples
            top = store.examples(f["latent"]).get("top", [])[:len(f["top"])]
            assert [(e["context"], e["position"]) for e in top] == [(t["view"], t["token"]) for t in f["top"]]
            assert [e["value"] for e in top] == pytest.approx([t["value"] for t in f["top"]], rel=1e-4)
        listed = store.list_features("density", True, 0, 10, live_only=True)
        assert [r["density"] for r in listed] == sorted((r["density"] for r in listed), reverse=True)
    finally:
        store.close()


def test_vision_run_with_another_method_on_patch_tokens(tiny_vits, photos, tmp_path):
    run_all(load_config(None, _overrides(tiny_vits, photos, tmp_path, method="relu", extra=["images.tokens=patches"])), progress=False)
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["n_tokens"] % 16 == 0 and result["cls_only_features"] == 0  # patches only: no CLS rows
    assert 0 < result["fvu"] < 1.5 and result["patch_rel_change"] >= 0


def test_vision_config_errors_name_the_fix(tiny_vits, photos, tmp_path):
    def run(*extra, method="topk"):
        return run_all(load_config(None, _overrides(tiny_vits, photos, tmp_path, method=method, extra=list(extra))), progress=False)

    with pytest.raises(FeaturekitError, match="multiple of the model's patch size 8"):
        run("images.size=30")
    with pytest.raises(FeaturekitError, match="language-model loss"):
        run("data.gradients=true", method="gsae")
    with pytest.raises(FeaturekitError, match="out of range"):
        run("site=mlp_hidden.3")
    with pytest.raises(FeaturekitError, match="unknown image source"):
        run("data.source=nowhere")
    assert not (tmp_path / "run").exists()  # every check ran before anything was written


def test_text_run_digests_do_not_see_the_images_section():
    cfg = RunConfig()
    before = config_digest(cfg)
    cfg.images.size = 224
    assert config_digest(cfg) != before
    cfg.images.size = None
    assert config_digest(cfg) == before


def test_embedded_vision_preprocessing_is_resolved_without_weights(photos):
    cfg = resolve(load_config(None, ["model.name=dinov2-s-focus", f"data.source={photos}"]))
    assert (cfg.images.size, cfg.images.mean, cfg.images.std) == (224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.tensor(cfg.images.std).shape == (3,)


def test_feature_figure_draws_the_top_views(tiny_vits, photos, tmp_path):
    from featurekit.pipeline.setup import open_model
    from featurekit.pipeline.vision import views
    from featurekit.vision.figures import feature_figure, latent_maps

    cfg = resolve(load_config(None, _overrides(tiny_vits, photos, tmp_path, extra=["dictionary.k=8"])))
    run_all(cfg, progress=False)
    tops = json.loads((tmp_path / "run" / "features" / "top_patches.json").read_text())
    vm, sae = open_model(cfg), load(tmp_path / "run" / "dictionary")
    test = views(cfg, vm, "test", cfg.eval.tokens)
    feature = max(tops, key=lambda f: len(f["top"]))
    ids = list(dict.fromkeys(t["view"] for t in feature["top"]))[:3]
    maps, cls = latent_maps(vm, sae, cfg.site, test, feature["latent"], ids)
    assert maps.shape == (len(ids), 4, 4) and cls.shape == (len(ids),)
    best = feature["top"][0]  # the map's largest patch code is the top example's value
    if best["kind"] == "patch":
        assert float(maps[ids.index(best["view"]), best["row"], best["col"]]) == pytest.approx(best["value"], rel=1e-4)
    path = feature_figure(vm, sae, cfg.site, test, feature["latent"], ids, tmp_path / "f.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] == len(ids) * 232 + 8


def test_text_only_steps_refuse_a_vision_run_by_name(tiny_vits, photos, tmp_path):
    from featurekit.pipeline import run_eval, run_features

    cfg = resolve(load_config(None, _overrides(tiny_vits, photos, tmp_path)))
    with pytest.raises(FeaturekitError, match="has no trained dictionary yet"):
        run_eval(cfg)
    with pytest.raises(FeaturekitError, match="is a vision run: its store is built from its held-out images"):
        run_features(cfg, text="tiny")
    with pytest.raises(FeaturekitError, match="has no trained dictionary yet"):
        run_features(cfg)


def test_streamed_vision_training_matches_the_cached_run(tiny_vits, photos, tmp_path):
    """data.cache=false: the training views run through the model on every pass (no activation cache on disk): the
    same seeded views, as many steps as a cached run, a dictionary as good (the shuffle order differs: the shuffle
    buffer is fed per view batch, not per cache shard)."""
    streamed, cached = tmp_path / "streamed", tmp_path / "cached"
    for out, cache in ((streamed, "false"), (cached, "true")):
        run_all(load_config(None, _overrides(tiny_vits, photos, out, extra=["dictionary.k=8", f"data.cache={cache}"])),
                progress=False)
    assert not (streamed / "run" / "activations").exists() and (cached / "run" / "activations").is_dir()
    steps = [[json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if '"step"' in line][-1]
             for out in (streamed, cached)]
    assert steps[0] == steps[1] > 0
    a, b = (json.loads((out / "run" / "eval.json").read_text()) for out in (streamed, cached))
    assert a["complete"] and a["l0"] == pytest.approx(8.0) and a["fvu"] == pytest.approx(b["fvu"], abs=0.05)
    assert load(streamed / "run" / "dictionary").metadata["source"]["identity"]["model_digest"] == \
        load(cached / "run" / "dictionary").metadata["source"]["identity"]["model_digest"]
