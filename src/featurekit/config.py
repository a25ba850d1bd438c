"""Run configuration: plain dataclasses, loadable from YAML/JSON, overridable from the CLI.

The defaults are the main job (`make run`). A run directory keeps the fully resolved config in
`config.json`; `featurekit run --config runs/NAME/config.json` reproduces the run.
Overrides use dotted keys: `train.lr=1e-3`, `dictionary.n_latents=8192`, `site=resid_post.8`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ._io import StrictJSONError, unique_keys
from .errors import FeaturekitError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  #: embedded name, local directory, .gguf file or Hub id
    dtype: str = "auto"  #: harvest dtype: auto (bf16 where the CPU/GPU supports it), float32, bfloat16
    device: str = "cpu"


@dataclass
class DataConfig:
    source: str = "bbc"  #: embedded corpus name, local .txt/.jsonl/.parquet, or hf:NAME
    #: what the held-out split holds out: documents (5 % of documents, by a hash of their text; a .txt file's documents
    #: are separated by blank lines) | contexts (5 % of the packed contexts, at least one: for a source of few documents)
    holdout: str = "documents"
    context_len: int = 128  #: tokens per packed context
    train_tokens: int = 600_000  #: activation tokens harvested for training (after exclusions)
    exclude_first: bool = True  #: drop position 0 of each context (attention sink, massive norm)
    exclude_special: bool = True  #: drop BOS/EOS/pad and other special tokens
    max_norm_multiple: float | None = 50.0  #: drop tokens with norm > this × the batch median (attention sinks); null keeps all
    harvest_batch: int = 16  #: contexts per forward pass
    shard_tokens: int = 65_536  #: tokens per cache shard
    gradients: bool = False  #: also harvest the LM-loss gradient at the site (g-SAE); a backward per batch
    cache: bool = True  #: write an activation cache (resumable); false streams harvest → trainer, re-harvesting each epoch


@dataclass
class DictionaryConfig:
    method: str = "topk"  #: a key of featurekit.dictionaries.METHODS (topk, batchtopk, jumprelu, ...)
    n_latents: int = 4608
    k: int = 32  #: TopK family (batch forms: mean latents per token over a batch)
    selection: str = "exact"  #: topk/abstopk per-token rule: exact | statistical (Spark mean + c·std, c calibrated) | statistical_gaussian
    threshold_decay: float = 0.99  #: BatchTopK: EMA factor of the inference threshold (statistical selection: of c)
    prefixes: list[int] | None = None  #: Matryoshka: nested widths m_1 < … < F (F appended if missing); null → F/16, F/8, F/4, F/2, F
    l1_coefficient: float = 5.0  #: ReLU only (training scale: mean input norm √d)
    l0_coefficient: float = 1.0  #: JumpReLU: λ of the L0 penalty (sweep it for a target L0)
    bandwidth: float = 0.1  #: JumpReLU: ε of the straight-through estimator (training scale E‖x‖ = √d; paper 0.001 at E‖x‖² = 1)
    threshold_init: float = 0.1  #: JumpReLU: initial θ (training scale)
    init_firing_rate: float | None = 0.1  #: JumpReLU: b_enc init so each latent fires on this share of the init sample; null → b_enc = 0
    beta: float = 1.0  #: g-SAE: weight of the gradient term in the selection score (0 = TopK); needs data.gradients=true
    afa_coefficient: float = 1 / 64  #: top-AFA: λ_AFA of the norm-matching loss (‖f‖ ≈ ‖x − b_dec‖); the code sweeps 1/128…1/16
    kl_coefficient: float = 0.01  #: vSAE: β of the KL term to N(0, I) (training scale, ramped; ≥ 0.1 collapsed on synthetic data)
    learned_variance: bool = True  #: vSAE: encoder learns log σ² (false: σ = 1)
    residual_threshold: float | None = None  #: MP-SAE (k = pursuit steps): stop a token once ‖r‖ ≤ this × ‖x − b_dec‖; null runs all k
    revive_coef: float = 0.01  #: MP-SAE: λ of the revive term pulling atoms unused in the batch towards the residual; 0 = off
    itda_threshold: float = 4e-4  #: ITDA (k = MP steps, n_latents = size cap): add a token when ‖x/‖x‖ − x̂/‖x̂‖‖²/d > this; needs < 1/d
    snmf_sparsity: float = 0.01  #: SNMF (n_latents = rank; chunks = train.batch_size): share of neurons kept per feature, ⌈s·d⌉; 1 = dense
    snmf_nnls_iters: int = 30  #: SNMF: FISTA iterations of the nonnegative least-squares codes, in the fit and at inference
    snmf_decay: float = 0.8  #: SNMF: β, per-chunk discount of the fit's statistics (memory ≈ 1/(1−β) chunks)
    snmf_passes: int = 3  #: SNMF: passes over the training tokens (read in order)
    gba_groups: int = 10  #: GBA: neuron groups, each with its own target activation frequency (1 = plain bias adaptation)
    gba_freq_high: float = 0.1  #: GBA: target frequency of the first group (the only one when gba_groups = 1)
    gba_freq_low: float = 0.001  #: GBA: target frequency of the last group (geometric in between)
    gba_rate_down: float = 0.05  #: GBA: γ₋, bias step down (× the window's peak pre-activation) above target (paper 0.01, long runs)
    gba_rate_up: float = 0.05  #: GBA: γ₊, bias step up (× the group's mean peak) for neurons firing below gba_eps (paper 0.01)
    gba_every: int = 5  #: GBA: training steps per frequency window, one bias update each (paper: 50 steps of 512 tokens)
    gba_eps: float = 1e-6  #: GBA: a neuron firing on less than this share of the window counts as dead and is raised
    gba_bias_min: float | None = None  #: GBA: lower clamp of the biases (training scale); null = none
    gba_activation: str = "jumprelu"  #: GBA: jumprelu (the bias only gates, as in the paper's LLM runs) | relu (the theory)
    gba_two_sided: bool = False  #: GBA: also raise neurons firing below their target (ours), so frequencies track the targets


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 4096
    lr: float = 2e-3
    warmup_steps: int = 20
    decay_fraction: float = 0.2  #: linear decay to 0 over the last fraction of steps
    sparsity_warmup_fraction: float = 0.05  #: ReLU, JumpReLU: λ ramps linearly from 0 over this fraction of steps
    max_grad_norm: float | None = None
    auxk_coef: float = 1 / 32
    k_aux: int | None = None  #: None → d/2
    aux_zipf_coef: float = 0.0  #: aux_zipf_loss (aux-k over latents firing below τ × their Zipf-fit density); any method, 0 = off
    aux_zipf_tau: float = 0.1  #: aux_zipf_loss: a latent is underutilised below τ × its Zipf-expected density
    dead_tokens: int | None = None  #: dead-latent window; None → min(10M, total tokens / 4)
    normalize: str = "mean_norm"  #: mean_norm (E‖x‖ = √d, one scalar) | none
    b_dec_init: str = "geometric_median"  #: geometric_median | mean | zero
    buffer_tokens: int = 131_072  #: token-level shuffle buffer
    checkpoint_every: int = 50  #: steps
    log_every: int = 10
    seed: int = 0
    #: torch threads; None on CPU: the fastest of 1, 2, 4, … up to torch's default, timed on the run's first steps
    #: (train/threads.py; set it for runs that must repeat bit for bit)
    threads: int | None = None
    #: fp32 | bf16: bf16 runs the dictionary's forward under a bf16 autocast (sparse methods: the encoder GEMM and the
    #: selection in bf16, the selected values, decoder, loss and optimizer in fp32; see BENCHMARKS.md)
    precision: str = "fp32"
    shard_latents: bool = False  #: under torchrun: split the latents across the processes (TopK), not the batch
    #: where gradient-trained dictionaries train: auto (the process's GPU when torch sees CUDA, under torchrun the rank's
    #: GPU; else the CPU) | cpu | cuda | cuda:N. Batches move there as they are read; ITDA and SNMF fit on the CPU
    device: str = "auto"
    #: glibc: serve large blocks from the heap and keep freed memory for the next step (no per-step page faults;
    #: featurekit/train/memory.py); process-wide, resident memory stays at its peak
    keep_freed_memory: bool = True


@dataclass
class EvalConfig:
    tokens: int = 65_536  #: held-out tokens for FVU/L0/dead (after exclusions)
    splice_contexts: int = 64  #: held-out contexts for CE / KL with the dictionary spliced in
    batch_contexts: int = 16


@dataclass
class ReportConfig:
    n_features: int = 24  #: live features shown with their top examples
    top_n: int = 8


@dataclass
class RunConfig:
    name: str = "default"
    out_dir: str = "runs"
    site: str = "resid_post.6"  #: see the README for why (measured)
    output_site: str | None = None  #: transcoders: the site they predict from `site`; null with site=mlp_in.L → mlp_out.L
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    if not isinstance(data, dict):
        what = f"config key {where.rstrip('.')}" if where else "a config"
        raise FeaturekitError(f"{what} must be a mapping of keys to values (a JSON object), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        named = [f"{where}{k} (did you mean {where}{close}?)" if (close := did_you_mean(k, names)) else where + k for k in unknown]
        raise FeaturekitError(f"unknown config key(s) {', '.join(named)}; valid: {sorted(where + n for n in names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise FeaturekitError(f"config key {where + key} must be a mapping, got {value!r}")
            kwargs[key] = from_dict(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, where + key)
    return cls(**kwargs)


def did_you_mean(key: str, names: typing.Iterable[str]) -> str | None:
    """The valid name `key` most likely meant: same letters without underscores (nlatents → n_latents),
    its initials (learning_rate → lr), or a close spelling (difflib)."""
    names = sorted(names)
    squash = key.replace("_", "").lower()
    initials = "".join(word[:1] for word in key.lower().split("_") if word)
    for name in names:
        if name.replace("_", "").lower() == squash or ("_" in key and name == initials):
            return name
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return close[0] if close else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the file (YAML or JSON) if given, then `key=value` overrides."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return from_dict(RunConfig, data)
    except FeaturekitError as err:
        if path is None or not _fails(read_config_file(path)):
            raise
        raise FeaturekitError(f"config file {path}: {err}") from err


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file. A file that is missing, binary, not UTF-8, not valid
    YAML/JSON (named with the line and column), or that gives a key twice raises FeaturekitError."""
    path = Path(path)
    if not path.is_file():
        raise FeaturekitError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise FeaturekitError(f"could not read config file {path}: {err.strerror or err}; check its permissions") from err
    if b"\0" in raw:
        raise FeaturekitError(f"config file {path} is a binary file (it holds NUL bytes), not YAML or JSON text: "
                              "pass the .yaml or .json config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise FeaturekitError(f"config file {path} is not UTF-8 text (byte {err.start}, line {line}): "
                              "save it as UTF-8") from err
    data = _parse_json(text, path) if path.suffix.lower() == ".json" else _parse_yaml(text, f"config file {path}")
    if data is None:  # an empty YAML file: the defaults
        return {}
    if not isinstance(data, dict):
        raise FeaturekitError(f"config file {path} must hold a mapping at the top level (key: value lines), "
                              f"got {type(data).__name__}")
    return data


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        raise FeaturekitError(f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
                              "fix it there (a file that ends early is truncated: restore or rewrite it)") from err
    except StrictJSONError as err:
        raise FeaturekitError(f"config file {path}: {err}") from err


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data, no Python objects) that refuses a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader itself refuses an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping: keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, what: str) -> Any:
    """YAML `text` as plain data; `what` (the file or the override) is named in the error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or str(err)
        if "'\\t'" in problem:
            problem += "; YAML does not allow tab characters there: indent with spaces"
        elif "python/" in problem:
            problem += ("; that tag asks YAML to build a Python object, and featurekit reads configs as plain data "
                        "(it never runs code from them): remove the tag")
        elif "appears twice" not in problem:
            problem += "; fix the YAML there"
        raise FeaturekitError(f"{what} is not valid YAML{where}: {problem}") from err
    except yaml.YAMLError as err:
        raise FeaturekitError(f"{what} is not valid YAML ({err}); fix the YAML") from err


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set one dotted `key=value` (the value read as YAML) inside `data`."""
    if "=" not in item:
        raise FeaturekitError(f"override {item!r} must look like key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    node = data
    *parents, leaf = key.strip().split(".")
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(parents[: i + 1])
            raise FeaturekitError(f"override {item!r}: config key {section} is a value, not a section with keys")
    node[leaf] = _parse_yaml(raw, f"the value of override {item!r}")


def _fails(data: dict[str, Any]) -> bool:
    """True if `data` alone does not build a RunConfig (so an error comes from the file, not the overrides)."""
    try:
        from_dict(RunConfig, data)
    except FeaturekitError:
        return True
    return False


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a scalar against its annotation (int, float, str, bool, Optional[...])."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise FeaturekitError(f"config key {key} cannot be null")
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(target) is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(target)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        raise FeaturekitError(f"config key {key} must be a list, e.g. {key}=[1,2], got {value!r}")
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if not isinstance(value, (dict, list)):
            return str(value)
    raise FeaturekitError(f"config key {key} must be {getattr(target, '__name__', target)}, got {value!r}")


def non_finite(cfg: Any, where: str = "") -> list[tuple[str, float]]:
    """(key, value) of every NaN or infinite float in config dataclass `cfg`, nested sections and lists included."""
    found: list[tuple[str, float]] = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), where + f.name
        if dataclasses.is_dataclass(value):
            found += non_finite(value, key + ".")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, float) and not math.isfinite(item):
                found.append((f"{key}[{i}]" if isinstance(value, list) else key, item))
    return found


def validate(cfg: RunConfig) -> None:
    """Check ranges and choices before any work starts; each error names the key and the fix."""
    for key, value in non_finite(cfg):
        raise FeaturekitError(f"config key {key} must be a finite number, got {value} (NaN and infinities are refused)")
    positive = {
        "data.context_len": cfg.data.context_len, "data.train_tokens": cfg.data.train_tokens,
        "data.harvest_batch": cfg.data.harvest_batch, "data.shard_tokens": cfg.data.shard_tokens,
        "dictionary.n_latents": cfg.dictionary.n_latents, "dictionary.k": cfg.dictionary.k,
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size, "train.lr": cfg.train.lr,
        "train.checkpoint_every": cfg.train.checkpoint_every, "train.log_every": cfg.train.log_every,
        "train.buffer_tokens": cfg.train.buffer_tokens, "eval.tokens": cfg.eval.tokens,
        "eval.splice_contexts": cfg.eval.splice_contexts, "eval.batch_contexts": cfg.eval.batch_contexts,
    }
    for key, value in positive.items():
        if value <= 0:
            raise FeaturekitError(f"config key {key} must be positive, got {value}")
    for key, value in {"train.dead_tokens": cfg.train.dead_tokens, "train.k_aux": cfg.train.k_aux,
                       "train.threads": cfg.train.threads, "data.max_norm_multiple": cfg.data.max_norm_multiple}.items():
        if value is not None and value <= 0:
            raise FeaturekitError(f"config key {key} must be positive or null, got {value}")
    from .dictionaries import METHODS  # the registry is the one list of methods

    choices = {"train.normalize": (cfg.train.normalize, ("mean_norm", "none")),
               "train.b_dec_init": (cfg.train.b_dec_init, ("geometric_median", "mean", "zero")),
               "data.holdout": (cfg.data.holdout, ("documents", "contexts")),
               "dictionary.method": (cfg.dictionary.method, tuple(sorted(METHODS)))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise FeaturekitError(f"config key {key} must be one of {list(allowed)}, got {value!r}")
    if cfg.output_site is not None and not METHODS[cfg.dictionary.method].transcodes:
        raise FeaturekitError(f"output_site={cfg.output_site} is for methods that predict another site (transcoder, skiptranscoder); "
                              f"dictionary.method={cfg.dictionary.method} reconstructs `site` itself: drop output_site")
    if METHODS[cfg.dictionary.method].needs_gradient and not cfg.data.gradients:
        raise FeaturekitError(f"dictionary.method={cfg.dictionary.method} trains on LM-loss gradients; set data.gradients=true "
                              f"(the harvest then runs a backward pass per batch)")
    if cfg.dictionary.k > cfg.dictionary.n_latents:
        raise FeaturekitError(f"dictionary.k={cfg.dictionary.k} exceeds dictionary.n_latents={cfg.dictionary.n_latents}")
    from .dictionaries.topk import SELECTIONS

    if cfg.dictionary.selection not in SELECTIONS:
        raise FeaturekitError(f"config key dictionary.selection must be one of {list(SELECTIONS)}, got {cfg.dictionary.selection!r}")
    if cfg.dictionary.selection != "exact" and "selection" not in inspect.signature(METHODS[cfg.dictionary.method]).parameters:
        raise FeaturekitError(f"dictionary.selection={cfg.dictionary.selection} applies to per-token TopK methods (topk, abstopk), "
                              f"not to {cfg.dictionary.method}; drop it or change dictionary.method")
    if not 0 <= cfg.dictionary.threshold_decay < 1:
        raise FeaturekitError(f"dictionary.threshold_decay must lie in [0, 1), got {cfg.dictionary.threshold_decay}")
    if cfg.train.buffer_tokens < cfg.train.batch_size:
        raise FeaturekitError(f"train.buffer_tokens ({cfg.train.buffer_tokens}) must be at least train.batch_size ({cfg.train.batch_size})")
    if not 0 <= cfg.train.decay_fraction <= 1 or not 0 <= cfg.train.sparsity_warmup_fraction <= 1:
        raise FeaturekitError("train.decay_fraction and train.sparsity_warmup_fraction must lie in [0, 1]")
    from .train.distributed import train_device

    train_device(cfg.train.device)  # a device that is not there fails now, not after the harvest
    if cfg.train.aux_zipf_coef < 0 or cfg.train.aux_zipf_tau <= 0:
        raise FeaturekitError(f"train.aux_zipf_coef must be ≥ 0 and train.aux_zipf_tau > 0, got {cfg.train.aux_zipf_coef}, "
                              f"{cfg.train.aux_zipf_tau}")
