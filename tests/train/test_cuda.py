"""The training paths on a CUDA GPU: the same checks as on CPU, where a GPU is present (CI has none: skipped).

On CUDA the sparse kernels are torch ops (`embedding_bag` decoder, cuSPARSE CSR product for the encoder's
weight gradient, `sampled_addmm` for exact values at pairs); they must train the model that the plain dense
formulas train on the same GPU, and the model the CPU trains, within fp32 tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from featurekit.dictionaries.kernels import plain_kernels
from featurekit.train import distributed

from .test_fast_paths import ARGS, _jumprelu_path, _train  # noqa: F401 (_jumprelu_path: the autouse fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("method", sorted(ARGS))
def test_cuda_fast_path_trains_like_the_plain_dense_path_and_the_cpu(method, tmp_path):
    fast_losses, fast_state = _train(method, tmp_path / "fast", device="cuda")
    with plain_kernels():
        plain_losses, plain_state = _train(method, tmp_path / "plain", precision="plain", device="cuda")
    cpu_losses, cpu_state = _train(method, tmp_path / "cpu")
    assert fast_losses[-1] < fast_losses[0]
    for other, state in ((plain_losses, plain_state), (cpu_losses, cpu_state)):
        torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(other), rtol=1e-4, atol=1e-6)
        for name, value in state.items():
            torch.testing.assert_close(fast_state[name], value, rtol=1e-3, atol=1e-4, msg=f"{method}.{name}")


@pytest.mark.parametrize("method", ["topk", "batchtopk", "jumprelu", "jumprelu-dense"])
def test_cuda_bf16_autocast_stays_within_its_documented_tolerance(method, tmp_path):
    fp32, _ = _train(method, tmp_path / "fp32", device="cuda")
    bf16, _ = _train(method, tmp_path / "bf16", precision="bf16", device="cuda")
    rel = (torch.tensor(bf16) - torch.tensor(fp32)).abs() / torch.tensor(fp32)
    assert float(rel.max()) < 0.02  # BENCHMARKS.md: bf16 loss curves within 2 % of fp32


def test_train_device_auto_takes_the_gpu():
    assert distributed.train_device("auto").type == "cuda"
    assert distributed.train_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("cache,device,model_device", [(True, "auto", "cpu"), (False, "cuda", "cpu"), (False, "cpu", "cuda")])
def test_pipeline_trains_where_train_device_says(tiny, tmp_path, cache, device, model_device):
    """Cached batches come from the CPU, streamed ones from the model's device: either way they reach the
    dictionary's device; the saved dictionary names where it trained and loads on the CPU."""
    import featurekit
    from featurekit import pipeline

    from ..test_pipeline import config

    cfg = config(tiny, tmp_path, "name=g", f"data.cache={str(cache).lower()}", f"train.device={device}",
                 f"model.device={model_device}")
    if cache:
        pipeline.run_harvest(cfg, progress=False)
    trained = pipeline.run_train(cfg, progress=False)
    on_gpu = device != "cpu"
    assert trained.W_dec.is_cuda == on_gpu
    sae = featurekit.load(cfg.run_dir / "dictionary")
    assert sae.metadata["provenance"]["device"] == ("cuda:0" if on_gpu else "cpu")
    assert ("threads" in sae.metadata["provenance"]) == (not on_gpu)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < rows[0]["fvu"]
