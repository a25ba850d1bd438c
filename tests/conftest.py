"""Test-wide setup: never reach the Hugging Face Hub; one torch thread (the 2-vCPU CI machine behaves
like one core, and a second thread makes small ops slower and timings erratic under load)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folder with a tiny random Llama (`model/`) and a text file (`text.txt`): see tests/tiny.py."""
    from .tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """Folder with a tiny random BertModel (`model/`, no LM head) and a text file (`text.txt`): see tests/tiny.py."""
    from .tiny import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_run(tiny, tmp_path_factory):
    """A finished run on the tiny model (topk, 64 latents at resid_post.1) with its feature store; shared, so
    treat it as read-only (copy it with shutil.copytree before writing into it)."""
    from featurekit import pipeline

    from .test_pipeline import config

    cfg = config(tiny, tmp_path_factory.mktemp("tiny_run"), "name=tiny_run", "features.tokens=3000", "features.top_n=8",
                 "features.cofire_tokens=100000")
    pipeline.run_all(cfg, progress=False)
    return cfg.run_dir
