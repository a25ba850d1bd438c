"""Images for a vision run: where they come from, the held-out split, seeded views, and the preprocessing.

Sources (``data.source`` of a vision run; several joined with ``+``, e.g. ``skimage+./my_photos``):

* ``skimage``     the photos and scans scikit-image ships offline (`SKIMAGE_LOADERS`: 25 images; the
                  25×25 ``lfw_subset`` faces and the random ``binary_blobs`` are left out);
* ``sklearn``     scikit-learn's sample images (china.jpg, flower.jpg), where scikit-learn is installed;
* ``opencv-doc``  Debian's opencv-doc example photos (``/usr/share/doc/opencv-doc/examples/data``), where installed;
* ``photos``      all of the above that are installed here (at least one must be);
* a folder        every .jpg/.jpeg/.png/.bmp/.gif/.webp/.tif file in it (sorted, not recursive), read with PIL;
* ``hf:PATH``     a Hugging Face ``datasets`` dataset saved on this machine (``save_to_disk``): its first
                  Image column (local only: nothing is downloaded).

Every image has a name; the held-out split is the ⌈15 %⌉ of images (at least one, none of a single
image) with the smallest sha256 of their name, so it does not move when the set is read again.

A *view* is one 3 × size × size input. View 0 of an image is its plain view: the shorter side resized to
``size`` (bicubic) and the centre cropped (``crop: center``), or the whole image squashed (``crop: resize``).
Views 1, 2, ... stretch a small set: a random crop of ``scale_min``–100 % of the image's area (aspect 3/4–4/3),
resized to size × size, flipped left-right with probability ½ (``flip``), drawn from a generator seeded by
(seed, image, view), so every view is the same on every machine and in every run. Pixels are scaled to
[0, 1] and normalised with ``mean``/``std`` per channel. `Preprocess` holds these settings; the run's
config and the saved dictionary record them, and `Preprocess.from_dict` rebuilds the transform.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featurekit.errors import FeaturekitError

SKIMAGE_LOADERS = ("astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
                   "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                   "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "stereo_motorcycle",
                   "text")
OPENCV_DOC = Path("/usr/share/doc/opencv-doc/examples/data")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_FRACTION = 0.15
SOURCES_HELP = ("a vision source is skimage, sklearn, opencv-doc, photos, a folder of images, or hf:PATH (a datasets "
                "folder saved with save_to_disk); join several with '+'")


@dataclass(frozen=True)
class NamedImage:
    name: str  #: source:identifier, unique within a run
    image: Image.Image  #: RGB


# -- sources --------------------------------------------------------------------------------------
def _rgb(array: np.ndarray) -> Image.Image:
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(a * (255 if a.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    return Image.fromarray(a).convert("RGB")


def skimage_images() -> list[NamedImage]:
    """scikit-image's offline images (SKIMAGE_LOADERS), read once per process (about 4 s)."""
    return list(_skimage_images())


@functools.lru_cache(maxsize=1)
def _skimage_images() -> tuple[NamedImage, ...]:
    from skimage import data

    out = []
    for name in SKIMAGE_LOADERS:
        array = getattr(data, name)()
        out.append(NamedImage(f"skimage:{name}", _rgb(array[0] if isinstance(array, tuple) else array)))
    return tuple(out)


def sklearn_images() -> list[NamedImage]:
    if importlib.util.find_spec("sklearn") is None:
        raise FeaturekitError("the image source 'sklearn' needs scikit-learn, which is not installed: install it "
                              "(pip install scikit-learn) or use another source (skimage, a folder of images)")
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return [NamedImage(f"sklearn:{Path(f).name}", _rgb(a)) for f, a in zip(bunch.filenames, bunch.images)]


def folder_images(folder: Path, label: str | None = None) -> list[NamedImage]:
    """Every image file directly in ``folder`` (sorted by name); an unreadable file is named in the error."""
    if not folder.is_dir():
        raise FeaturekitError(f"image folder {folder} does not exist: {SOURCES_HELP}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FeaturekitError(f"image folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for path in files:
        try:
            with Image.open(path) as im:
                out.append(NamedImage(f"{label or 'folder'}:{path.name}", im.convert("RGB")))
        except OSError as err:
            raise FeaturekitError(f"{path} is not a readable image ({err}); remove it from {folder} or fix it") from err
    return out


def hf_images(path: str) -> list[NamedImage]:
    """The first Image column of a ``datasets`` dataset saved on disk (``Dataset.save_to_disk``)."""
    if importlib.util.find_spec("datasets") is None:
        raise FeaturekitError(f"the image source hf:{path} needs the datasets package: pip install datasets")
    import datasets

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FeaturekitError(f"hf:{path}: no such folder; vision runs read Hugging Face datasets saved on this machine "
                              f"(dataset.save_to_disk(folder)), nothing is downloaded")
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[sorted(ds)[0]] if "train" not in ds else ds["train"]
    columns = [name for name, feature in ds.features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        raise FeaturekitError(f"hf:{path} has no Image column (columns: {', '.join(ds.features)})")
    return [NamedImage(f"hf:{folder.name}:{i}", im.convert("RGB")) for i, im in enumerate(ds[columns[0]])]


def _photos() -> list[NamedImage]:
    out = skimage_images() if importlib.util.find_spec("skimage") else []
    if importlib.util.find_spec("sklearn"):
        out += sklearn_images()
    if OPENCV_DOC.is_dir():
        out += folder_images(OPENCV_DOC, "opencv-doc")
    if not out:
        raise FeaturekitError("the image source 'photos' found no images: install scikit-image (or scikit-learn, or "
                              "Debian's opencv-doc), or pass a folder of images")
    return out


def load_images(source: str) -> list[NamedImage]:
    """All images of ``source`` (module docstring), in a fixed order; names must not repeat."""
    images: list[NamedImage] = []
    for part in str(source).split("+"):
        part = part.strip()
        if part == "skimage":
            images += skimage_images()
        elif part == "sklearn":
            images += sklearn_images()
        elif part == "opencv-doc":
            if not OPENCV_DOC.is_dir():
                raise FeaturekitError(f"the image source 'opencv-doc' needs Debian's opencv-doc package ({OPENCV_DOC} is "
                                      f"missing): apt-get install opencv-doc, or use another source")
            images += folder_images(OPENCV_DOC, "opencv-doc")
        elif part == "photos":
            images += _photos()
        elif part.startswith("hf:"):
            images += hf_images(part[3:])
        elif part and Path(part).expanduser().is_dir():
            images += folder_images(Path(part).expanduser(), Path(part).name)
        else:
            raise FeaturekitError(f"unknown image source {part!r}: {SOURCES_HELP}")
    names = [im.name for im in images]
    if len(set(names)) != len(names):
        raise FeaturekitError(f"image source {source!r} names an image twice; give each source once")
    return images


def held_out(names: list[str]) -> set[str]:
    """The held-out images: the ⌈TEST_FRACTION · N⌉ names (at least 1, none of 1) with the smallest sha256."""
    n_test = min(max(1, math.ceil(TEST_FRACTION * len(names))), len(names) - 1)
    return set(sorted(names, key=lambda n: hashlib.sha256(n.encode()).digest())[:max(n_test, 0)])


def split_images(images: list[NamedImage], split: str) -> list[NamedImage]:
    """The images of ``split`` ("train", "test" or "all")."""
    if split == "all":
        return images
    test = held_out([im.name for im in images])
    if not test:
        raise FeaturekitError(f"{len(images)} image(s) are too few to hold one out: give at least two images")
    return [im for im in images if (im.name in test) == (split == "test")]


def images_digest(images: list[NamedImage]) -> str:
    """sha256 over every image's name, size and RGB bytes, in order (the run's data identity)."""
    h = hashlib.sha256(b"featurekit.images.v1\n")
    for im in images:
        h.update(f"{im.name}\t{im.image.size}\n".encode())
        h.update(hashlib.sha256(im.image.tobytes()).digest())
    return h.hexdigest()


# -- preprocessing and views ----------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input (module docstring). Recorded in config and dictionary."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "center"  #: center | resize
    scale_min: float = 0.35
    flip: bool = True

    def __post_init__(self) -> None:
        if self.crop not in ("center", "resize"):
            raise FeaturekitError(f"images.crop={self.crop!r}: use center (resize the shorter side, crop the centre) or resize")
        if not 0 < self.scale_min <= 1:
            raise FeaturekitError(f"images.scale_min={self.scale_min} must be in (0, 1]: the smallest share of an image "
                                  f"a random crop keeps")
        if self.size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise FeaturekitError(f"bad preprocessing {self}: size ≥ 1, three means and three positive stds")

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "resample": "bicubic"}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        """From a run's or dictionary's record (keys as `to_dict` writes them)."""
        try:
            return cls(int(data["size"]), tuple(map(float, data["mean"])), tuple(map(float, data["std"])),
                       str(data.get("crop", "center")), float(data.get("scale_min", 0.35)), bool(data.get("flip", True)))
        except (KeyError, TypeError, ValueError) as err:
            raise FeaturekitError(f"the preprocessing record {data!r} is incomplete ({err}): it needs size, mean and std") from err

    def plain(self, image: Image.Image) -> Image.Image:
        """View 0: the image at size × size without augmentation."""
        if self.crop == "resize":
            return image.resize((self.size, self.size), Image.BICUBIC)
        w, h = image.size
        scale = self.size / min(w, h)
        image = image.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def augmented(self, image: Image.Image, rng: torch.Generator) -> Image.Image:
        """A random crop (scale_min–1 of the area, aspect 3/4–4/3), resized, maybe flipped."""
        w, h = image.size
        u = torch.rand(4, generator=rng).tolist()
        area = w * h * (self.scale_min + (1 - self.scale_min) * u[0])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
        left, top = round((w - cw) * u[2]), round((h - ch) * u[3])
        out = image.crop((left, top, left + cw, top + ch)).resize((self.size, self.size), Image.BICUBIC)
        if self.flip and float(torch.rand(1, generator=rng)) < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return out

    def tensor(self, image: Image.Image) -> torch.Tensor:
        """(3, size, size) float32: pixels in [0, 1], normalised per channel."""
        a = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32) / 255.0)
        return ((a - torch.tensor(self.mean)) / torch.tensor(self.std)).permute(2, 0, 1).contiguous()

    def view(self, image: Image.Image, index: int, view: int, seed: int) -> torch.Tensor:
        """View ``view`` of image number ``index`` (0 = plain) as a normalised tensor."""
        if view == 0:
            return self.tensor(self.plain(image))
        rng = torch.Generator().manual_seed(hash_seed(seed, index, view))
        return self.tensor(self.augmented(image, rng))


def hash_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Views:
    """The views a run uses: view ``v`` is image ``v % n_images``, augmentation ``v // n_images`` (so every
    image's plain view comes first). ``pixels(indices)`` builds the (n, 3, size, size) inputs on demand."""

    images: tuple[NamedImage, ...]
    preprocess: Preprocess
    n_views: int
    seed: int

    def which(self, v: int) -> tuple[int, int]:
        return v % len(self.images), v // len(self.images)

    def name(self, v: int) -> str:
        i, j = self.which(v)
        return f"{self.images[i].name}#{j}"

    def pixels(self, indices: list[int] | range) -> torch.Tensor:
        out = []
        for v in indices:
            i, j = self.which(v)
            out.append(self.preprocess.view(self.images[i].image, i, j, self.seed))
        return torch.stack(out) if out else torch.empty(0, 3, self.preprocess.size, self.preprocess.size)


def make_views(images: list[NamedImage], preprocess: Preprocess, n_tokens: int, tokens_per_view: int, seed: int) -> Views:
    """Enough views of ``images`` to hold ``n_tokens`` tokens: ⌈n_tokens / tokens_per_view⌉."""
    if not images:
        raise FeaturekitError(f"no images to view: {SOURCES_HELP}")
    return Views(tuple(images), preprocess, max(1, math.ceil(n_tokens / tokens_per_view)), seed)

