"""The run configuration's sections: plain dataclasses whose `#:` comments are the keys' documentation
(`featurekit config` prints them). The defaults are the main job (`make run`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dictionaries.registry import method_class


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  #: embedded name, local directory (HF, or a `featurekit moex train` run folder), .gguf file or Hub id
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
    """The dictionary: its method, its width, and the method's own hyper-parameters (`params`, an instance of
    the method's Params dataclass from the registry). In YAML/JSON and with --set they sit flat beside
    `method` and `n_latents` (`dictionary.k=32`); a key the method does not take is refused."""

    method: str = "topk"  #: a registered method (featurekit config --methods)
    n_latents: int = 4608  #: latents (features) of the dictionary
    params: Any = None  #: the method's Params (filled with its defaults when None)

    def __post_init__(self) -> None:
        if self.params is None:
            self.params = method_class(self.method).Params()

    @classmethod
    def of(cls, method: str, n_latents: int = 4608, **params: Any) -> DictionaryConfig:
        """DictionaryConfig.of("topk", 4608, k=32): the method's Params built from keyword arguments."""
        return cls(method, n_latents, method_class(method).Params(**params))

    def to_dict(self) -> dict[str, Any]:
        """The flat form of config files: method, n_latents and the Params fields."""
        return {"method": self.method, "n_latents": self.n_latents, **dataclasses.asdict(self.params)}


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
    #: featurekit/train/memory.py); process-wide, so the featurekit command applies it (the library does not);
    #: resident memory stays at its peak
    keep_freed_memory: bool = True


@dataclass
class EvalConfig:
    tokens: int = 65_536  #: held-out tokens for FVU/L0/dead (after exclusions)
    splice_contexts: int = 64  #: held-out contexts for CE / KL with the dictionary spliced in
    batch_contexts: int = 16
    probing_train_docs: int = 200  #: sparse probing: training documents per BBC topic (SAEBench: 4,000 per task)
    probing_test_docs: int = 100  #: sparse probing: held-out documents per topic at most (BBC's held-out split has 20-32)
    probing_tokens: int = 128  #: sparse probing: tokens per document (its first ones; SAEBench's context length)
    probing_ks: str = "1,2,5,20"  #: sparse probing: the k of the k-sparse probes, comma-separated
    absorption_words: int = 4000  #: absorption: single-token words drawn from the vocabulary (0: all, SAEBench)
    absorption_icl: int = 10  #: absorption: in-context example lines before every read word (SAEBench: 10)
    absorption_words_per_sequence: int = 40  #: absorption: words read per packed prompt sequence
    absorption_max_k: int = 10  #: absorption: k-sparse probes for k = 1..max_k (SAEBench: 10)
    absorption_l1_steps: int = 300  #: absorption: Adam steps of the L1 latent-ranking probe
    steering_features: int = 4  #: steering: dictionary features steered (alive ones, drawn with train.seed)
    steering_baselines: int = 4  #: steering: directions of each baseline (random, difference of means, PCA)
    steering_targets: str = "0.5,1,2"  #: steering: the target next-token KLs (nats), comma-separated
    steering_prompts: int = 4  #: steering: held-out prompts the KL and the output score average over
    steering_prompt_tokens: int = 16  #: steering: tokens per prompt (each position t >= 1 is a next-token prediction)
    steering_top_tokens: int = 10  #: steering: a direction's promoted tokens (top of its logit effect) for the output score
    steering_tokens: int = 4096  #: steering: held-out tokens for choosing features, difference of means and PCA
    splice_ablation: str = "zero"  #: splice_all: the baseline of loss recovered, "zero" or "mean" (each site's mean activation)
    splice_curves: str = "alone,cumulative"  #: splice_all: beside all at once, each dictionary alone and/or layers 0..L ("" neither)


@dataclass
class FeaturesConfig:
    """The feature store (`featurekit features`, the last step of `featurekit run`)."""

    tokens: int = 200_000  #: tokens the store is built from: the held-out split first, then training text to fill the budget
    top_n: int = 20  #: top activating contexts kept per feature (signed codes: also the 20 most negative)
    band_n: int = 5  #: samples shown per activation-quantile band (5 bands, from a uniform sample of 100 codes per feature)
    cofire_tokens: int = 16_384  #: tokens (a hash-chosen sample) whose co-firing between features is counted
    batch_contexts: int = 16  #: contexts per forward pass


@dataclass
class ImagesConfig:
    """Vision runs only (model.name a vision model: the embedded dinov2-s-focus, or a local ViT / DINOv2 / CLIP or
    SigLIP vision-tower folder; data.source an image source, docs/vision.md). Null values are filled from the
    model when the run starts, so the saved config and dictionary state the preprocessing in full."""

    size: int | None = None  #: square input size in pixels (a multiple of the patch size); null: the model's
    mean: list[float] | None = None  #: per-channel mean of the normalisation (RGB, pixels in [0, 1]); null: the model's
    std: list[float] | None = None  #: per-channel std of the normalisation; null: the model's
    crop: str = "center"  #: center (shorter side to size, centre crop) | resize (squash the whole image)
    scale_min: float = 0.35  #: views after the first: random crops of scale_min–100 % of an image's area
    flip: bool = True  #: views after the first: flipped left-right with probability 1/2
    tokens: str = "all"  #: the tokens harvested and spliced: all (CLS and patches) | patches | cls


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
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, as config.json holds it (the dictionary section flat)."""
        data = dataclasses.asdict(self)
        data["dictionary"] = self.dictionary.to_dict()
        return data
