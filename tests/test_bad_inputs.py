"""Bad inputs a user tried: each gives a clear FeaturekitError that names the file, never a traceback
or a silent acceptance.

Two tables. CLI_CASES run the real command line in-process (`featurekit train --config BAD`,
`featurekit eval RUN_DIR` on a run folder whose config.json is bad, `--set` overrides) and check exit
code 2, `featurekit: error:` and no traceback. LOADER_CASES call the loader (dictionary files, the
activation cache, checkpoints, text sources, JSON and file writes) and check the FeaturekitError names
the file. Each case also names words its message must hold. A property test feeds damaged copies
(truncated, one byte changed) of a valid state.json, featurekit.json and manifest.json to their loaders.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import featurekit
from featurekit._io import atomic_write, atomic_write_json, read_json
from featurekit.cli import main
from featurekit.config import RunConfig
from featurekit.data.batch import ActivationBatch
from featurekit.data.cache import ActivationCache, write_cache
from featurekit.data.sources import load_texts
from featurekit.dictionaries import TopKSAE, save
from featurekit.errors import FeaturekitError
from featurekit.train.checkpoint import load_checkpoint, save_checkpoint

# --- valid files to damage -------------------------------------------------------------------------


def valid_dictionary(root: Path) -> Path:
    path = root / "dictionary"
    save(TopKSAE(8, 16, k=2, seed=0), path)
    return path


def valid_cache(root: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    batches = [ActivationBatch(acts={"resid_post.1": torch.randn(6, 4, generator=gen), "mlp_out.0": torch.randn(6, 3, generator=gen)},
                               token_ids=torch.arange(6), context_idx=torch.zeros(6, dtype=torch.long), position=torch.arange(6))
               for _ in range(3)]
    write_cache(root / "cache", batches, {"model": "tiny", "sites": ["mlp_out.0", "resid_post.1"]}, shard_tokens=8)
    return root / "cache"


def valid_checkpoint(root: Path) -> Path:
    folder = root / "checkpoint"
    meta = {"step": 3, "tokens": 768, "total_steps": 10, "digest": "abc", "optimizer_scalars": {}, "threads": None}
    save_checkpoint(folder, {"sae.W_dec": torch.randn(16, 8), "rng": torch.get_rng_state()}, meta)
    return folder


def run_folder(root: Path) -> Path:
    cfg = RunConfig()
    cfg.out_dir, cfg.name = str(root), "run"
    cfg.run_dir.mkdir(parents=True)
    atomic_write_json(cfg.run_dir / "config.json", cfg.to_dict())
    valid_dictionary(cfg.run_dir)
    return cfg.run_dir


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def put(data: dict, key: str, value) -> None:
    """Set a dotted key ("shards.0.file") in nested JSON; value DROP deletes it."""
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[int(part)] if isinstance(data, list) else data[part]
    if value is DROP:
        del data[leaf]
    else:
        data[int(leaf) if isinstance(data, list) else leaf] = value


DROP = object()

# --- dictionary files: featurekit.load ------------------------------------------------------------

DICT_META = [  # (id, key, value, words in the message)
    ("missing-d_in", "d_in", DROP, "d_in is missing"),
    ("missing-method", "method", DROP, "method is missing"),
    ("missing-n_latents", "n_latents", DROP, "n_latents is missing"),
    ("d_in-string", "d_in", "8", "positive integer"),
    ("d_in-float", "d_in", 8.0, "positive integer"),
    ("d_in-bool", "d_in", True, "positive integer"),
    ("d_in-null", "d_in", None, "d_in is missing"),
    ("n_latents-zero", "n_latents", 0, "positive integer"),
    ("n_latents-negative", "n_latents", -16, "positive integer"),
    ("dtype-float33", "dtype", "float33", "float33"),
    ("dtype-number", "dtype", 32, "dtype"),
    ("hyperparam-unknown", "hyperparams", {"k": 2, "frobnicate": 1}, "frobnicate"),
    ("hyperparams-list", "hyperparams", [2], "hyperparams must be an object"),
    ("hyperparam-k-string", "hyperparams", {"k": "five"}, "hyperparams.k must be int"),
    ("hyperparam-k-float", "hyperparams", {"k": 2.5}, "hyperparams.k must be int"),
    ("hyperparam-k-bool", "hyperparams", {"k": True}, "hyperparams.k must be int"),
    ("hyperparam-k-too-big", "hyperparams", {"k": 99}, "k must be in"),
    ("method-unknown", "method", "nope", "not one of"),
    ("method-number", "method", 5, "not one of"),
    ("format-missing", "format", DROP, "expected 'featurekit.dictionary'"),
    ("format-other", "format", "sae_lens", "expected 'featurekit.dictionary'"),
    ("format_version-missing", "format_version", DROP, "no format_version"),
    ("format_version-string", "format_version", "1", "must be a positive integer"),
    ("format_version-zero", "format_version", 0, "must be a positive integer"),
    ("format_version-float", "format_version", 1.5, "must be a positive integer"),
    ("format_version-newer", "format_version", 99, "newer than this featurekit reads"),
    ("d_in-disagrees-with-tensors", "d_in", 12, "do not belong together"),
]
DICT_META_RAW = [  # (id, bytes of featurekit.json or a function of the valid bytes, words)
    ("json-string", b'"hello"', "must hold a JSON object"),
    ("json-list", b"[1, 2]", "must hold a JSON object"),
    ("not-utf8", b'{"format": "featurekit.dictionary\xff\xfe"}', "not UTF-8"),
    ("truncated", lambda good: good[: len(good) // 2], "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("bare-nan", lambda good: good.replace(b'"d_in": 8', b'"d_in": NaN'), "NaN"),
    ("duplicate-key", lambda good: good.replace(b'"d_in": 8', b'"d_in": 8, "d_in": 9'), "appears twice"),
]
DICT_TENSORS = [  # (id, edit of the tensors in model.safetensors, words)
    ("tensor-missing", lambda t: t.pop("b_enc"), "missing ['b_enc']"),
    ("tensor-extra", lambda t: t.update(W_extra=torch.zeros(2)), "unexpected ['W_extra']"),
    ("tensor-misshaped", lambda t: t.update(W_enc=torch.zeros(16, 9)), "W_enc has shape (16, 9)"),
    ("tensor-nan", lambda t: t["W_dec"].__setitem__((0, 0), float("nan")), "NaN or infinite"),
    ("tensor-inf", lambda t: t["b_enc"].__setitem__(3, float("inf")), "NaN or infinite"),
    ("input-scale-inf", lambda t: t["input_scale"].fill_(float("inf")), "input_scale"),
]


def dictionary_meta_case(edit):
    def make(root):
        path = valid_dictionary(root)
        meta = path / "featurekit.json"
        if callable(edit):
            edit(meta)
        return (lambda: featurekit.load(path)), meta
    return make


def dictionary_tensor_case(edit):
    def make(root):
        path = valid_dictionary(root)
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors")
        return (lambda: featurekit.load(path)), path / "model.safetensors"
    return make


def raw_bytes(content):
    return lambda meta: meta.write_bytes(content(meta.read_bytes()) if callable(content) else content)


def unfinite_save(name, value):
    def make(root):
        sae = TopKSAE(8, 16, k=2)
        with torch.no_grad():
            getattr(sae, name).view(-1)[0] = value
        return (lambda: save(sae, root / "saved")), root / "saved"
    return make


def dictionary_files(kind):
    def make(root):
        path = valid_dictionary(root)
        if kind == "meta-missing":
            (path / "featurekit.json").unlink()
            return (lambda: featurekit.load(path)), path
        weights = path / "model.safetensors"
        if kind == "weights-missing":
            weights.unlink()
        elif kind == "weights-truncated":
            weights.write_bytes(weights.read_bytes()[:40])
        else:
            weights.write_bytes(b'{"not": "safetensors"}')
        return (lambda: featurekit.load(path)), weights
    return make


# --- the activation cache: ActivationCache and iter_shards -----------------------------------------

CACHE_MANIFEST = [  # (id, key, value, words); the manifest is checked when the cache is opened
    ("no-shards", "shards", DROP, "'shards' is missing"),
    ("shards-not-list", "shards", {"0": 1}, "'shards' must be a list"),
    ("shard-not-object", "shards.0", "shard_00000.safetensors", "shards[0] must be an object"),
    ("shard-no-sha256", "shards.0.sha256", DROP, "shards[0] lacks ['sha256']"),
    ("shard-no-file", "shards.1.file", DROP, "shards[1] lacks ['file']"),
    ("shard-no-n_tokens", "shards.0.n_tokens", DROP, "shards[0] lacks ['n_tokens']"),
    ("shard-file-outside", "shards.0.file", "../escape.safetensors", "inside the cache folder"),
    ("shard-n_tokens-string", "shards.0.n_tokens", "8", "non-negative integer"),
    ("shard-n_tokens-negative", "shards.0.n_tokens", -8, "non-negative integer"),
    ("shard-sha256-number", "shards.0.sha256", 5, "hex string"),
    ("meta-not-object", "meta", "tiny", "'meta'"),
    ("meta-missing", "meta", DROP, "'meta'"),
    ("format_version-missing", "format_version", DROP, "no format_version"),
    ("format_version-newer", "format_version", 99, "upgrade featurekit"),
    ("sites-and-d-disagree", "sites", ["mlp_out.0", "resid_post.1", "resid_post.9"], "disagree"),
    ("d-not-object", "d", [4, 3], "'d' must map"),
    ("d-zero", "d", {"mlp_out.0": 0, "resid_post.1": 4}, "'d' must map"),
    ("dtype-unknown", "dtype", "float33", "'dtype' must name a torch dtype"),
    ("sites-not-list", "sites", "resid_post.1", "'sites' must be a list"),
]
CACHE_MANIFEST_RAW = [
    ("json-list", b"[]", "not an object"),
    ("json-string", b'"manifest"', "not an object"),
    ("truncated", lambda good: good[: len(good) // 3], "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("not-utf8", b"\xff\xfe{}", "not UTF-8"),
    ("duplicate-key", lambda good: good.replace(b'"complete": true', b'"complete": true, "complete": false'), "appears twice"),
]
CACHE_SHARDS = [  # (id, manifest edit, words, the file named); found when a shard is loaded (verify on and off)
    ("d-lies", lambda m: m["d"].update({"resid_post.1": 5}), "d['resid_post.1'] = 5", "manifest.json"),
    ("dtype-lies", lambda m: m.update(dtype="bfloat16"), "dtype is 'bfloat16'", "manifest.json"),
    ("extra-site", lambda m: (m["sites"].append("resid_post.9"), m["d"].update({"resid_post.9": 4})), "does not hold",
     "manifest.json"),
    ("shard-file-missing", lambda m: m["shards"][1].update(file="shard_00042.safetensors"), "the file is missing",
     "shard_00042.safetensors"),
]


def cache_case(edit, verify=True, load=False, named="manifest.json"):
    def make(root):
        folder = valid_cache(root)
        edit(folder / "manifest.json")
        if load:
            return (lambda: list(ActivationCache(folder).iter_shards(verify=verify))), folder / named
        return (lambda: ActivationCache(folder)), folder / named
    return make


# --- checkpoints: load_checkpoint ------------------------------------------------------------------

STATE = [  # (id, key, value, words)
    ("missing-step", "step", DROP, "has no 'step'"),
    ("missing-tokens", "tokens", DROP, "has no 'tokens'"),
    ("missing-tensors", "tensors", DROP, "has no 'tensors'"),
    ("missing-sha256", "tensors_sha256", DROP, "has no 'tensors_sha256'"),
    ("missing-total_steps", "total_steps", DROP, "has no 'total_steps'"),
    ("missing-optimizer_scalars", "optimizer_scalars", DROP, "has no 'optimizer_scalars'"),
    ("step-string", "step", "3", "'step'"),
    ("step-float", "step", 3.5, "'step'"),
    ("step-bool", "step", True, "'step'"),
    ("step-negative", "step", -1, "negative"),
    ("tokens-null", "tokens", None, "'tokens'"),
    ("optimizer_scalars-list", "optimizer_scalars", [], "'optimizer_scalars'"),
    ("threads-string", "threads", "two", "'threads'"),
    ("digest-number", "digest", 5, "'digest'"),
    ("tensors-outside", "tensors", "../../elsewhere.safetensors", "state-STEP.safetensors"),
    ("tensors-other-name", "tensors", "weights.bin", "state-STEP.safetensors"),
    ("sha256-mismatch", "tensors_sha256", "0" * 64, "does not match"),
]
STATE_RAW = [
    ("truncated", lambda good: good[: len(good) // 2], "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("not-utf8", b"\xff\xfe", "not UTF-8"),
    ("json-list", b"[3, 768]", "not an object"),
    ("duplicate-key", lambda good: good.replace(b'"step": 3', b'"step": 3, "step": 4'), "appears twice"),
    ("bare-infinity", lambda good: good.replace(b'"tokens": 768', b'"tokens": Infinity'), "Infinity"),
]


def state_case(edit):
    def make(root):
        folder = valid_checkpoint(root)
        edit(folder / "state.json")
        return (lambda: load_checkpoint(folder)), folder
    return make


def state_tensor_file(kind):
    def make(root):
        folder = valid_checkpoint(root)
        tensors = next(folder.glob("state-*.safetensors"))
        if kind == "missing":
            tensors.unlink()
        else:  # damaged, with state.json's digest updated to match: found when safetensors parses it
            tensors.write_bytes(b"\x05" * 64)
            edit_json(folder / "state.json", lambda m: m.update(tensors_sha256=hashlib.sha256(b"\x05" * 64).hexdigest()))
        return (lambda: load_checkpoint(folder)), folder
    return make


# --- text sources, JSON writes, file writes --------------------------------------------------------


def text_file(name, content):
    def make(root):
        path = root / name
        if name.endswith("/"):
            path.mkdir()
            (path / "good.txt").write_text("A good document.\n")
            path = path / "bad.txt"
        path.write_bytes(content)
        return (lambda: load_texts(str(root / name.rstrip("/")), "train")), path
    return make


def json_write(obj):
    def make(root):
        return (lambda: atomic_write_json(root / "out.json", obj)), root / "out.json"
    return make


def failing_write(exc):
    def make(root):
        target = root / "state-000000003.safetensors"

        def write(tmp):
            Path(tmp).write_bytes(b"half")
            raise exc

        return (lambda: atomic_write(target, write)), target
    return make


def read_json_of(kind):
    def make(root):
        path = root / "x.json"
        if kind == "directory":
            path.mkdir()
        return (lambda: read_json(path)), path
    return make


# --- other libraries' files (featurekit.interop): fixtures the libraries wrote, damaged -------------------------
INTEROP = Path(__file__).parent / "fixtures" / "interop"


def foreign(fixture: str, file: str, damage):
    """Copy fixture folder `fixture`, damage its `file` (damage(path)), load it with featurekit.load."""
    def make(root):
        import shutil
        folder = root / Path(fixture).name
        shutil.copytree(INTEROP / fixture, folder)
        damage(folder / file)
        return (lambda: featurekit.load(folder)), folder / file
    return make


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def cfg_set(key, value):
    return lambda path: edit_json(path, lambda m: put(m, key, value))


def tensors_edit(edit):
    def damage(path: Path) -> None:
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return damage


def npz_file(arrays):
    def make(root):
        import numpy as np
        folder = root / "gemma-scope-2b-pt-res" / "layer_3"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **arrays(np))
        return (lambda: featurekit.load(folder)), folder / "params.npz"
    return make


def gemma_arrays(np, drop=(), **over):
    p = {"W_enc": np.zeros((4, 6), np.float32), "b_enc": np.zeros(6, np.float32), "threshold": np.ones(6, np.float32),
         "W_dec": np.zeros((6, 4), np.float32), "b_dec": np.zeros(4, np.float32), **over}
    return {k: v for k, v in p.items() if k not in drop}


INTEROP_CASES = [
    pytest.param(foreign("saelens/topk", "sae_weights.safetensors", truncate), "cannot be read as safetensors", id="saelens-truncated"),
    pytest.param(foreign("saelens/topk", "cfg.json", cfg_set("d_sae", 99)), "do not belong together", id="saelens-cfg-shape"),
    pytest.param(foreign("saelens/jumprelu", "sae_weights.safetensors",
                         tensors_edit(lambda t: t.update(threshold=torch.zeros(5)))), "threshold has shape (5,)", id="saelens-wrong-shape"),
    pytest.param(foreign("saelens/topk", "sae_weights.safetensors", tensors_edit(lambda t: t.pop("b_dec"))), "missing ['b_dec']",
                 id="saelens-missing-tensor"),
    pytest.param(foreign("saelens/topk", "cfg.json", cfg_set("architecture", "hypernetwork")), "unknown SAELens architecture",
                 id="saelens-unknown-architecture"),
    pytest.param(foreign("saelens/standard", "cfg.json", cfg_set("architecture", "gated")), "no gated SAE", id="saelens-gated"),
    pytest.param(foreign("saelens/standard", "cfg.json", cfg_set("architecture", "skip_transcoder")), "does not map",
                 id="saelens-relu-transcoder"),
    pytest.param(foreign("saelens/topk", "cfg.json", cfg_set("normalize_activations", "layer_norm")), "rescales every token",
                 id="saelens-layer-norm"),
    pytest.param(foreign("saelens/topk", "cfg.json", raw_bytes(b'{"architecture": "topk", ')), "not valid JSON",
                 id="saelens-cfg-truncated"),
    pytest.param(foreign("saelens/topk", "sae_weights.safetensors",
                         tensors_edit(lambda t: t["W_dec"].view(-1).__setitem__(0, float("nan")))), "NaN", id="saelens-nan"),
    pytest.param(foreign("sparsify/sae/layers.6", "cfg.json", cfg_set("activation", "groupmax")), "groupmax", id="sparsify-groupmax"),
    pytest.param(foreign("sparsify/sae/layers.6", "sae.safetensors", truncate), "cannot be read", id="sparsify-truncated"),
    pytest.param(foreign("sparsify/sae/layers.6", "cfg.json", cfg_set("k", 0)), "k must be an integer", id="sparsify-bad-k"),
    pytest.param(foreign("sparsify/transcoder/layers.6.mlp", "sae.safetensors",
                         tensors_edit(lambda t: t.update(W_dec=torch.zeros(32, 15)))), "W_dec has shape (32, 15)",
                 id="sparsify-wrong-shape"),
    pytest.param(foreign("dictionary_learning/topk/trainer_0", "ae.pt", truncate), "cannot be read", id="dictlearning-truncated"),
    pytest.param(foreign("dictionary_learning/topk/trainer_0", "config.json", cfg_set("trainer.dict_class", "GatedAutoEncoder")),
                 "no gated SAE", id="dictlearning-gated"),
    pytest.param(foreign("dictionary_learning/topk/trainer_0", "config.json", cfg_set("trainer.dict_class", "CrossCoder")),
                 "does not map", id="dictlearning-unknown-class"),
    pytest.param(npz_file(lambda np: gemma_arrays(np, drop=("threshold",))), "missing ['threshold']", id="gemmascope-missing"),
    pytest.param(npz_file(lambda np: gemma_arrays(np, W_dec=np.zeros((6, 5), np.float32))), "W_dec has shape (6, 5)",
                 id="gemmascope-wrong-shape"),
    pytest.param(npz_file(lambda np: gemma_arrays(np, threshold=np.array([object()] * 6))), "pickled objects",
                 id="gemmascope-pickle"),
]


LOADER_CASES = [
    *[pytest.param(dictionary_meta_case(lambda p, k=k, v=v: edit_json(p, lambda m: put(m, k, v))), words,
                   id=f"dictionary-{name}") for name, k, v, words in DICT_META],
    *[pytest.param(dictionary_meta_case(raw_bytes(content)), words, id=f"dictionary-{name}") for name, content, words in DICT_META_RAW],
    *[pytest.param(dictionary_tensor_case(edit), words, id=f"dictionary-{name}") for name, edit, words in DICT_TENSORS],
    pytest.param(dictionary_files("meta-missing"), "featurekit.json is missing", id="dictionary-meta-missing"),
    pytest.param(dictionary_files("weights-missing"), "is missing", id="dictionary-weights-missing"),
    pytest.param(dictionary_files("weights-truncated"), "cannot be read", id="dictionary-weights-truncated"),
    pytest.param(dictionary_files("weights-garbage"), "cannot be read", id="dictionary-weights-not-safetensors"),
    pytest.param(unfinite_save("W_dec", float("nan")), "W_dec", id="save-nan-parameter"),
    pytest.param(unfinite_save("b_enc", float("-inf")), "b_enc", id="save-inf-parameter"),
    pytest.param(unfinite_save("input_scale", float("inf")), "input_scale", id="save-inf-buffer"),
    *[pytest.param(cache_case(lambda p, k=k, v=v: edit_json(p, lambda m: put(m, k, v))), words, id=f"cache-{name}")
      for name, k, v, words in CACHE_MANIFEST],
    *[pytest.param(cache_case(raw_bytes(content)), words, id=f"cache-{name}") for name, content, words in CACHE_MANIFEST_RAW],
    *[pytest.param(cache_case(lambda p, e=edit: edit_json(p, e), verify=verify, load=True, named=named), words,
                   id=f"cache-{name}-{'verify' if verify else 'noverify'}")
      for name, edit, words, named in CACHE_SHARDS for verify in (True, False)],
    *[pytest.param(state_case(lambda p, k=k, v=v: edit_json(p, lambda m: put(m, k, v))), words, id=f"checkpoint-{name}")
      for name, k, v, words in STATE],
    *[pytest.param(state_case(raw_bytes(content)), words, id=f"checkpoint-{name}") for name, content, words in STATE_RAW],
    pytest.param(state_tensor_file("missing"), "does not match", id="checkpoint-tensor-file-missing"),
    pytest.param(state_tensor_file("damaged"), "cannot be read", id="checkpoint-tensor-file-damaged"),
    pytest.param(text_file("binary.txt", b"\x7fELF\x02\x01\x00\x00payload"), "binary file", id="text-binary-txt"),
    pytest.param(text_file("latin1.txt", "Caf\xe9 au lait.\n\nSecond paragraph.".encode("latin-1")), "not UTF-8", id="text-latin1-txt"),
    pytest.param(text_file("utf16.txt", "Some text.".encode("utf-16")), "binary file", id="text-utf16-txt"),
    pytest.param(text_file("folder/", b"\x89PNG\r\n\x1a\n\x00\x00"), "binary file", id="text-binary-in-folder"),
    pytest.param(text_file("folder2/", b"na\xefve"), "not UTF-8", id="text-latin1-in-folder"),
    pytest.param(json_write({"fvu": 0.1, "per_site": [{"ce": float("nan")}]}), "per_site[0].ce is nan", id="json-write-nan"),
    pytest.param(json_write({"loss": float("inf")}), "loss is inf", id="json-write-inf"),
    pytest.param(json_write({"density": torch.tensor([0.5, float("nan")])}), "density[1] is nan", id="json-write-tensor-nan"),
    pytest.param(failing_write(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
                 "No space left on device", id="write-full-disk-safetensors"),
    pytest.param(failing_write(OSError(errno.ENOSPC, "No space left on device")), "free space", id="write-full-disk-oserror"),
    pytest.param(failing_write(OSError(errno.EROFS, "Read-only file system")), "read-only", id="write-read-only"),
    pytest.param(failing_write(PermissionError(errno.EACCES, "Permission denied")), "not writable", id="write-permission-denied"),
    pytest.param(read_json_of("missing"), "could not read", id="read-json-missing"),
    pytest.param(read_json_of("directory"), "could not read", id="read-json-directory"),
    *INTEROP_CASES,
]


@pytest.mark.parametrize("make,words", LOADER_CASES)
def test_loader_gives_a_clear_error_naming_the_file(tmp_path, make, words):
    call, named = make(tmp_path)
    with pytest.raises(FeaturekitError) as caught:
        call()
    message = str(caught.value)
    assert str(named) in message, message
    assert words in message, message
    assert not list(tmp_path.rglob("*.tmp")), "a temporary file was left behind"


# --- the command line ------------------------------------------------------------------------------

CONFIG_FILES = [  # (id, file name, content, words)
    ("yaml-tab", "c.yaml", b"train:\n\tlr: 0.001\n", "line 2, column 1"),
    ("yaml-python-object", "c.yaml", b"train: !!python/object/apply:os.system ['true']\n", "never runs code"),
    ("yaml-duplicate-key", "c.yaml", b"train:\n  lr: 0.001\n  lr: 0.002\n", "'lr' appears twice"),
    ("yaml-top-level-list", "c.yaml", b"- lr: 1\n", "mapping at the top level"),
    ("yaml-section-list", "c.yaml", b"train: [1, 2]\n", "train must be a mapping"),
    ("yaml-unclosed", "c.yaml", b"train: {lr: 1\n", "not valid YAML"),
    ("yaml-not-utf8", "c.yaml", b"site: caf\xe9\n", "not UTF-8"),
    ("binary-file", "c.yaml", b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary file"),
    ("json-truncated", "config.json", b'{"name": "x", "train": {"lr": ', "line 1, column 31"),
    ("json-empty", "config.json", b"", "not valid JSON"),
    ("json-trailing-comma", "config.json", b'{"name": "x",}', "not valid JSON"),
    ("json-duplicate-key", "config.json", b'{"train": {"lr": 1, "lr": 2}}', "'lr' appears twice"),
    ("json-list", "config.json", b"[1, 2]", "mapping at the top level"),
    ("json-not-utf8", "config.json", b'{"name": "\xff"}', "not UTF-8"),
    ("unknown-key-near-miss", "c.yaml", b"train:\n  learning_rate: 0.001\n", "did you mean train.lr?"),
    ("unknown-nested-near-miss", "c.yaml", b"dictionary:\n  nlatents: 64\n", "did you mean dictionary.n_latents?"),
    ("unknown-section", "c.yaml", b"trian:\n  lr: 0.001\n", "did you mean train?"),
    ("nan-in-file", "c.yaml", b"train:\n  lr: .nan\n", "train.lr must be a finite number"),
    ("missing-file", "absent.yaml", None, "does not exist"),
]
OVERRIDES = [  # (id, --set value, words)
    ("lr-inf", "train.lr=.inf", "train.lr must be a finite number"),
    ("lr-nan", "train.lr=.nan", "train.lr must be a finite number"),
    ("lr-nan-string", "train.lr=nan", "train.lr must be a finite number"),
    ("max_norm_multiple-nan", "data.max_norm_multiple=.nan", "data.max_norm_multiple must be a finite number"),
    ("threshold_decay-nan", "dictionary.threshold_decay=.nan", "dictionary.threshold_decay must be a finite number"),
    ("aux_zipf_tau-inf", "train.aux_zipf_tau=.inf", "train.aux_zipf_tau must be a finite number"),
    ("auxk_coef-minus-inf", "train.auxk_coef=-.inf", "train.auxk_coef must be a finite number"),
    ("learning_rate", "train.learning_rate=1e-3", "did you mean train.lr?"),
    ("nlatents", "dictionary.nlatents=64", "did you mean dictionary.n_latents?"),
    ("section-typo", "trian.lr=1e-3", "did you mean train?"),
    ("value-not-section", "site.layer=3", "site must be str"),
    ("bad-yaml-value", "train.lr=[1,", "not valid YAML"),
    ("key-of-another-method", "dictionary.prefixes=[64, .nan]", "unknown config key(s) dictionary.prefixes"),
    ("python-tag", "train.lr=!!python/name:os.system", "never runs code"),
]
RUN_CONFIGS = [  # (id, config.json bytes or edit, words): `featurekit eval RUN_DIR` and `train --resume RUN_DIR`
    ("truncated", lambda good: good[: len(good) // 2], "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("not-utf8", lambda good: good.replace(b'"name": "run"', b'"name": "r\xffn"'), "not UTF-8"),
    ("duplicate-key", lambda good: good.replace(b'"lr": 0.002', b'"lr": 0.002, "lr": 0.1'), "appears twice"),
    ("json-list", b"[]", "JSON object"),
    ("bare-nan", lambda good: good.replace(b'"lr": 0.002', b'"lr": NaN'), "NaN"),
    ("unknown-key", lambda good: good.replace(b'"lr": 0.002', b'"learning_rate": 0.002'), "did you mean train.lr?"),
]


#: errors found after the file is parsed (in from_dict, validate) name the key; the file only where the caller adds it
NAME_THE_KEY = ("did you mean", "finite number", "JSON object")


def config_file(name, content):
    def make(root):
        path = root / name
        if content is not None:
            path.write_bytes(content)
        return ["train", "--config", str(path)], path
    return make


def override(item):
    return lambda root: (["train", "--set", f"out_dir={root}", "--set", item], None)


def run_config(content, command):
    def make(root):
        run = run_folder(root)
        raw_bytes(content)(run / "config.json")
        return ([command, str(run)] if command == "eval" else ["train", "--resume", str(run)]), run / "config.json"
    return make


CLI_CASES = [
    *[pytest.param(config_file(file, content), words, id=f"config-{name}") for name, file, content, words in CONFIG_FILES],
    *[pytest.param(override(item), words, id=f"set-{name}") for name, item, words in OVERRIDES],
    *[pytest.param(run_config(content, command), words, id=f"{command}-config.json-{name}")
      for name, content, words in RUN_CONFIGS for command in ("eval", "resume")],
]


@pytest.mark.parametrize("make,words", CLI_CASES)
def test_command_line_exits_2_with_a_clear_error(tmp_path, capsys, make, words):
    argv, named = make(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "featurekit: error:" in err and "Traceback" not in err, err
    assert words in err, err
    if named is not None and not any(w in words for w in NAME_THE_KEY):
        assert str(named) in err, err
    assert not list(tmp_path.rglob("*.tmp"))


# --- damaged copies of valid files: a FeaturekitError or a correct load, nothing else ---------------

DAMAGED = {
    "state.json": (valid_checkpoint, "state.json", load_checkpoint),
    "featurekit.json": (valid_dictionary, "featurekit.json", featurekit.load),
    "manifest.json": (valid_cache, "manifest.json", lambda folder: list(ActivationCache(folder).iter_shards())),
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_file_gives_a_featurekit_error_or_loads(tmp_path_factory, name):
    build, file, load = DAMAGED[name]
    folder = build(tmp_path_factory.mktemp(name.replace(".", "-")))
    target = folder / file
    good = target.read_bytes()

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(cut=st.integers(0, len(good)), at=st.integers(0, len(good) - 1), byte=st.integers(0, 255), flip=st.booleans())
    def check(cut, at, byte, flip):
        damaged = bytearray(good[:cut])
        if flip and at < len(damaged):
            damaged[at] = byte
        target.write_bytes(bytes(damaged))
        try:
            load(folder)
        except FeaturekitError as err:
            assert str(target.parent) in str(err)
        finally:
            target.write_bytes(good)

    check()
