"""JumpReLU: the straight-through pseudo-derivatives by hand, ground-truth recovery, λ → L0, the file."""

import json

import torch

import featurekit
from featurekit.config import TrainConfig
from featurekit.dictionaries import JumpReLUSAE, save
from featurekit.dictionaries.jumprelu import _JumpReLUFn, _StepFn
from featurekit.evaluate.metrics import fvu, l0
from featurekit.train import Trainer

from ..train.synthetic import sample, true_features


def test_pseudo_derivatives_by_hand():
    # ε = 0.1: (π − θ)/ε = (−5, 0.2, 10) → only the middle entry is inside the rectangle kernel
    pre = torch.tensor([[0.5, 1.02, 2.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    out = _JumpReLUFn.apply(pre, theta, 0.1)
    assert out.tolist() == [[0.0, 1.0199999809265137, 2.0]]
    out.sum().backward()
    assert pre.grad.tolist() == [[0.0, 1.0, 1.0]]  # H(π − θ): no estimator on π
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -10.0, 0.0]))  # −(θ/ε)·K
    pre.grad, theta.grad = None, None
    step = _StepFn.apply(pre, theta, 0.1)
    assert step.tolist() == [[0.0, 1.0, 1.0]]
    step.sum().backward()
    assert pre.grad.abs().sum() == 0  # the L0 term trains only θ
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -10.0, 0.0]))  # −(1/ε)·K


def train(l0_coefficient, tmp_path):
    features = true_features(48, 24)
    sae = JumpReLUSAE(24, 96, l0_coefficient=l0_coefficient, seed=0)
    trainer = Trainer(sae, TrainConfig(lr=3e-3, warmup_steps=10, log_every=100, checkpoint_every=1000), tmp_path, 500)
    trainer.init_from_data(sample(features, 4096, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((sample(features, 256, gen) for _ in range(500)), progress=False)
    x = sample(features, 4096, torch.Generator().manual_seed(11))
    with torch.no_grad():
        codes = sae.encode(x)
        cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ features.T
    return sae, fvu(x, sae.decode(codes)), l0(codes), float(cos.max(0).values.mean())


def test_recovers_features_and_lambda_sets_the_sparsity(tmp_path):
    sae, error, sparse_l0, mmcs = train(0.05, tmp_path / "a")
    assert error < 0.25 and mmcs > 0.9 and 2.0 < sparse_l0 < 8.0
    theta = sae.theta.detach()
    assert (theta > 0).all() and float(theta.mean()) > 0.025  # thresholds were learned upward
    _, _, sparser_l0, _ = train(1.0, tmp_path / "b")
    assert sparser_l0 < 0.6 * sparse_l0


def test_fold_and_file_round_trip(tmp_path):
    sae = JumpReLUSAE(8, 32, seed=0)
    with torch.no_grad():
        sae.theta.uniform_(0.1, 1.0)
        sae.b_enc.normal_()
        sae.input_scale.fill_(0.3)
    x = torch.randn(64, 8) * 3
    expected = sae.encode(x)
    assert (expected != 0).any()
    sae.fold_input_scale()
    torch.testing.assert_close(sae.encode(x), expected)
    save(sae, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "featurekit.json").read_text())["inference_rule"]["activation"] == "jumprelu"
    torch.testing.assert_close(featurekit.load(tmp_path / "d").encode(x), expected)
