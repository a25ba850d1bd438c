"""Image sources, the held-out split, seeded views and the preprocessing record; the harvest's token kinds."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from featurekit.errors import FeaturekitError
from featurekit.vision.harvest import CLS, PATCH, harvest_views, token_mask
from featurekit.vision.images import OPENCV_DOC, SKIMAGE_LOADERS, Preprocess, held_out, images_digest, load_images, make_views, split_images
from featurekit.vision.models import load_vision_model

PRE = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _folder(tmp_path, n=5):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 50, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_skimage_photos_load_offline_as_rgb():
    images = load_images("skimage")
    assert [im.name for im in images] == [f"skimage:{n}" for n in SKIMAGE_LOADERS]
    assert all(im.image.mode == "RGB" for im in images)
    assert images_digest(images) == images_digest(load_images("skimage"))


def test_folder_and_joined_sources(tmp_path):
    folder = _folder(tmp_path)
    images = load_images(f"{folder}+skimage")
    assert len(images) == 5 + len(SKIMAGE_LOADERS)
    assert images[0].name == f"{folder.name}:im0.png"
    with pytest.raises(FeaturekitError, match="twice"):
        load_images(f"{folder}+{folder}")
    with pytest.raises(FeaturekitError, match="unknown image source"):
        load_images("no-such-source")
    (folder / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FeaturekitError, match="bad.jpg is not a readable image"):
        load_images(str(folder))


def test_optional_sources_skip_or_explain():
    if importlib.util.find_spec("sklearn") is None:
        with pytest.raises(FeaturekitError, match="needs scikit-learn"):
            load_images("sklearn")
    else:
        assert len(load_images("sklearn")) == 2
    if not OPENCV_DOC.is_dir():
        with pytest.raises(FeaturekitError, match="opencv-doc"):
            load_images("opencv-doc")
    # 'photos' takes whatever is installed: here at least scikit-image's
    assert len(load_images("photos")) >= len(SKIMAGE_LOADERS)


def test_hf_dataset_saved_on_disk(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)) for _ in range(3)]
    ds = datasets.Dataset.from_dict({"label": [0, 1, 2], "img": pics}, features=datasets.Features(
        {"label": datasets.Value("int64"), "img": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    images = load_images(f"hf:{tmp_path / 'ds'}")
    assert [im.name for im in images] == ["hf:ds:0", "hf:ds:1", "hf:ds:2"]
    assert np.array_equal(np.asarray(images[2].image), np.asarray(pics[2]))
    with pytest.raises(FeaturekitError, match="saved on this machine"):
        load_images(f"hf:{tmp_path / 'missing'}")


def test_held_out_split_is_stable_and_disjoint(tmp_path):
    images = load_images(str(_folder(tmp_path, 10)))
    test, train = split_images(images, "test"), split_images(images, "train")
    assert len(test) == 2 and len(train) == 8 and not {i.name for i in test} & {i.name for i in train}
    assert held_out([im.name for im in reversed(images)]) == {im.name for im in test}
    with pytest.raises(FeaturekitError, match="too few"):
        split_images(images[:1], "test")


def test_views_are_seeded_and_view_zero_is_plain(tmp_path):
    images = load_images(str(_folder(tmp_path)))
    views = make_views(images, PRE, n_tokens=17 * 12, tokens_per_view=17, seed=3)
    assert views.n_views == 12 and views.which(7) == (2, 1) and views.name(0) == f"{tmp_path.name}:im0.png#0"
    a, b = views.pixels(range(12)), make_views(images, PRE, 17 * 12, 17, seed=3).pixels(range(12))
    assert a.shape == (12, 3, 32, 32) and torch.equal(a, b)
    other_seed = make_views(images, PRE, 17 * 12, 17, seed=4).pixels(range(12))
    assert torch.equal(a[:5], other_seed[:5]) and not torch.equal(a[5:], other_seed[5:])  # plain views do not depend on the seed
    plain = PRE.plain(images[0].image)
    assert plain.size == (32, 32)
    assert torch.allclose(a[0], (torch.from_numpy(np.asarray(plain, dtype=np.float32) / 255).permute(2, 0, 1) - 0.5) / 0.25)


def test_preprocess_record_round_trips_and_bad_values_are_named():
    assert Preprocess.from_dict(PRE.to_dict()) == PRE
    with pytest.raises(FeaturekitError, match="images.crop"):
        Preprocess(32, (0, 0, 0), (1, 1, 1), crop="zoom")
    with pytest.raises(FeaturekitError, match="needs size, mean and std"):
        Preprocess.from_dict({"size": 32})


def test_harvest_keeps_token_kind_and_position(tiny_vits, tmp_path):
    vm = load_vision_model(str(tiny_vits["dinov2"]))
    views = make_views(load_images(str(_folder(tmp_path))), PRE, n_tokens=17 * 7, tokens_per_view=17, seed=0)
    batches = list(harvest_views(vm, views, ["resid_post.1", "mlp_hidden.0"], batch_size=3, progress=False))
    assert [b.n_tokens for b in batches] == [51, 51, 17]
    first = batches[0]
    assert first.acts["resid_post.1"].shape == (51, 32) and first.acts["mlp_hidden.0"].shape == (51, 64)
    assert first.token_ids[:3].tolist() == [CLS, PATCH, PATCH] and int((first.token_ids == CLS).sum()) == 3
    assert first.context_idx.tolist() == [0] * 17 + [1] * 17 + [2] * 17 and first.position[:17].tolist() == list(range(17))
    patches = list(harvest_views(vm, views, ["resid_post.1"], batch_size=4, tokens="patches", progress=False))
    assert sum(b.n_tokens for b in patches) == 7 * 16 and bool((patches[0].token_ids == PATCH).all())
    # rows are the model's activations at those tokens
    with torch.no_grad():
        from featurekit.models.hooks import capture

        with capture(vm.model, "resid_post.1") as acts:
            vm.forward(views.pixels(range(3)))
    torch.testing.assert_close(first.acts["resid_post.1"], acts["resid_post.1"].reshape(51, 32))
    assert token_mask(vm, 32, "cls").sum() == 1
    with pytest.raises(FeaturekitError, match="images.tokens"):
        token_mask(vm, 32, "everything")
