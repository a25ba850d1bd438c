"""The kernels corner's surface: no private names cross files, kernel choices live in the dictionary that
made them and come out as JSON for its provenance, and the plain reference switch."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

import featurekit
from featurekit.config import TrainConfig
from featurekit.dictionaries import METHODS, Output
from featurekit.dictionaries.kernels import KernelChoice, kernel_choices, plain_active, plain_kernels
from featurekit.train import Trainer
from featurekit.train.trainer import RECON_LOSSES

SRC = Path(featurekit.__file__).parent


def test_no_private_name_is_imported_from_another_file():
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("featurekit")):
                found += [f"{path.relative_to(SRC)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_each_dictionary_owns_its_kernel_choices_and_lists_them_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREKIT_CACHE", str(tmp_path / "cache"))
    a, b = METHODS["topk"](16, 64, k=4, seed=0), METHODS["batchtopk"](16, 64, k=4, seed=0)
    assert isinstance(a.kernel_choice, KernelChoice) and a.kernel_choice is not b.kernel_choice
    trainer = Trainer(a, TrainConfig(batch_size=32, threads=1), tmp_path / "run", 2)
    x = torch.randn(32, 16)
    trainer.init_from_data(x)
    for _ in range(2):
        trainer.train_step(x, RECON_LOSSES[a.recon_loss])
    choices = kernel_choices(a)
    assert json.loads(json.dumps(choices)) == choices
    assert choices["encoder_gemm"] == "mm_bias" and choices["topk_selection"] == "fp32" and choices["certified"] is False
    assert kernel_choices(b)["answers"] == {} and "encoder_gemm" not in kernel_choices(b)  # b never ran
    assert kernel_choices(object()) == {}


def test_plain_kernels_switch_nests_and_restores():
    assert not plain_active()
    with plain_kernels():
        assert plain_active()
        with plain_kernels():
            assert plain_active()
        assert plain_active()
    assert not plain_active()


def test_output_names_one_thing_each():
    """A dense forward: `pre_at` gathers from `pre` with its graph; `top_pre` ranks `pre`."""
    sae = METHODS["relu"](8, 32, seed=0)
    out = sae(torch.randn(5, 8))
    assert isinstance(out, Output) and out.idx is None and out.values is None and out.has_pre
    idx, pair_pre = out.top_pre(3, torch.ones(32, dtype=torch.bool))
    torch.testing.assert_close(out.pre_at(idx, pair_pre), pair_pre)
    assert out.pre_at(idx).requires_grad
