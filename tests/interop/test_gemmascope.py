"""A Gemma Scope params.npz built by the documented layout loads as a JumpReLU SAE matching a hand computation
(π = x W_enc + b_enc, uncentred; z = π·1[π > θ]; x̂ = z W_dec + b_dec)."""

from __future__ import annotations

import numpy as np
import torch

import featurekit


def write_params(folder, d=16, f=24, seed=0):
    rng = np.random.default_rng(seed)
    p = {"W_enc": rng.normal(size=(d, f)).astype(np.float32) / 4, "b_enc": rng.normal(size=f).astype(np.float32) / 10,
         "threshold": rng.uniform(0.05, 0.6, size=f).astype(np.float32), "W_dec": rng.normal(size=(f, d)).astype(np.float32) / 4,
         "b_dec": rng.normal(size=d).astype(np.float32)}
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **p)
    return p


def test_gemma_scope_npz_matches_the_hand_computation(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_6" / "width_16k" / "average_l0_71"
    p = write_params(folder)
    sae = featurekit.load(folder)  # the folder or the file itself
    assert sae.method == "jumprelu" and sae.metadata["source"]["site"] == "resid_post.6"
    assert sae.metadata["provenance"]["imported_from"]["format"] == "gemmascope"
    x = np.random.default_rng(1).normal(size=(40, 16)).astype(np.float32)
    pre = x @ p["W_enc"] + p["b_enc"]
    z = pre * (pre > p["threshold"])
    x_hat = z @ p["W_dec"] + p["b_dec"]
    assert 0 < (z != 0).sum(1).mean() < 24
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(x))
        np.testing.assert_array_equal(codes.numpy() != 0, z != 0)
        np.testing.assert_allclose(codes.numpy(), z, atol=1e-5 * np.abs(z).max())
        np.testing.assert_allclose(sae.decode(codes).numpy(), x_hat, atol=1e-5 * np.abs(x_hat).max())
    same = featurekit.load(folder / "params.npz", site="resid_post.7", model="google/gemma-2-2b")
    assert same.metadata["source"] == {**sae.metadata["source"], "site": "resid_post.7", "model": "google/gemma-2-2b"}
