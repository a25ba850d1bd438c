"""Per-machine kernel choices, owned by the dictionary that makes them (`Dictionary.kernel_choice`).

Some kernels have two exact implementations whose order of speed depends on the CPU: the encoder GEMM (MKL
with the bias in the product, or oneDNN) and each certified selection (through a bf16 product, or fp32).
A `KernelChoice` answers each such question once per key (CPU, torch version, kernel, dtype, shape, thread
count): from the cache folder's `gemm_choice.json` where the machine answered it before, else by timing the
candidates (`fastest`) and recording the answer there. Later runs on the machine then take the same kernels,
so a run repeated from its config reproduces its weights bit for bit. The file is the machine's memory; the
object is the run's: it keeps the answers it used, the certified selections' candidate widths, and lists its
choices as a JSON-able dict for the dictionary's provenance (`kernel_choices`).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from ..._io import atomic_write_json, cache_dir


class KernelChoice:
    """The kernel choices of one dictionary (a run): answers to per-machine questions and the certified widths."""

    def __init__(self) -> None:
        #: question key → answer, as read from or written to the cache file
        self.answers: dict[str, str] = {}
        #: kernel name → the implementation it took last (`note`)
        self.taken: dict[str, str] = {}
        #: the certified selections' candidate widths, per selection and shape (`selection.with_width`); they
        #: change the speed only, never the answer
        self.widths: dict[tuple, int] = {}

    def answer(self, key: str, allowed, probe: Callable[[], str]) -> str:
        """The machine's answer to `key` from cache_dir()/gemm_choice.json, or `probe()`'s, then recorded there
        (the file is read again just before writing: a probe may itself have recorded another answer)."""
        if key not in self.answers:
            path = cache_dir() / "gemm_choice.json"

            def known() -> dict:
                try:
                    return json.loads(path.read_text())
                except (OSError, ValueError):
                    return {}

            answer = known().get(key)
            if answer not in allowed:
                answer = probe()
                try:
                    atomic_write_json(path, {**known(), key: answer})
                except OSError:  # a read-only cache: probe again next time
                    pass
            self.answers[key] = answer
        return self.answers[key]

    def note(self, kernel: str, taken: str) -> None:
        """Record that `kernel` (e.g. "encoder GEMM") ran as `taken` (e.g. "onednn")."""
        self.taken[kernel] = taken

    def as_dict(self) -> dict[str, Any]:
        """The choices as JSON: {"encoder_gemm": "onednn", "topk_selection": "fp32", "certified": false,
        "machine": ..., "answers": {question key: answer}}; kernel names in snake case."""
        taken = {name.lower().replace("-", "").replace(" ", "_"): value for name, value in self.taken.items()}
        return {**taken, "certified": "certified" in self.taken.values(),
                "machine": f"{cpu_name()} | torch {torch.__version__}", "answers": dict(self.answers)}


def kernel_choices(dictionary: Any) -> dict[str, Any]:
    """The kernel choices made for `dictionary` so far (its training run), as a JSON-able dict for its
    provenance; {} for an object without a `kernel_choice`."""
    choice = getattr(dictionary, "kernel_choice", None)
    return choice.as_dict() if isinstance(choice, KernelChoice) else {}


def fastest(choices: dict, *args, rounds: int = 3) -> str:
    """The name of the fastest function in `choices` on `args`: best of `rounds` timings each, taken in
    turns so that a slow spell of the machine hits every candidate alike (a single timing each picked the
    slower kernel about one time in three on a 2-vCPU VM, whose speed drifts)."""
    best = dict.fromkeys(choices, float("inf"))
    for fn in choices.values():
        fn(*args)  # warm-up (first-call packing, allocation)
    for _ in range(rounds):
        for name, fn in choices.items():
            start = time.perf_counter()
            fn(*args)
            best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()
