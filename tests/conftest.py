"""Test-wide setup: never reach the Hugging Face Hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folder with a tiny random Llama (`model/`) and a text file (`text.txt`): see tests/tiny.py."""
    from .tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny"))
