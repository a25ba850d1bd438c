"""`train.device`: which device a run trains on, and the errors for a device that is not there."""

from __future__ import annotations

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.train.distributed import train_device


def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu():
    assert train_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert train_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_a_gpu_that_is_not_there_is_a_clear_error(spec):
    with pytest.raises(FeaturekitError, match=r"train\.device=.*no CUDA GPU.*train\.device=auto or cpu"):
        train_device(spec)


@pytest.mark.parametrize("spec", ["gpu0", "meta", ""])
def test_a_device_featurekit_cannot_train_on_is_refused(spec):
    with pytest.raises(FeaturekitError, match=r"train\.device=.*auto, cpu, cuda or cuda:N"):
        train_device(spec)


def test_the_config_check_names_a_bad_device_before_any_work():
    from featurekit.config import load_config
    from featurekit.pipeline import resolve  # every command resolves its config before any work

    with pytest.raises(FeaturekitError, match=r"train\.device='tpu'"):
        resolve(load_config(None, ["train.device=tpu"]))
    resolve(load_config(None, ["train.device=cpu"]))


def test_batches_follow_the_dictionary_to_its_device():
    from featurekit.dictionaries import TopKSAE
    from featurekit.train.distributed import rank_batches

    sae = TopKSAE(4, 8, k=2).to("meta")  # a device other than the batches' (a GPU's stand-in on a CPU machine)
    single, pair = list(rank_batches([torch.ones(3, 4), (torch.ones(3, 4), torch.zeros(3, 2))], sae))
    assert single.device.type == "meta" and single.shape == (3, 4)
    assert isinstance(pair, tuple) and [t.device.type for t in pair] == ["meta", "meta"] and pair[1].shape == (3, 2)
    batch = torch.ones(3, 4)
    assert next(rank_batches([batch], TopKSAE(4, 8, k=2))) is batch  # already there: not copied
