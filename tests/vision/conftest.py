import pytest

from .tiny_vit import BUILDERS, write_tiny_vit


@pytest.fixture(scope="session")
def tiny_vits(tmp_path_factory):
    """{name: folder} of tiny random HF vision models (tests/vision/tiny_vit.py)."""
    root = tmp_path_factory.mktemp("tiny_vits")
    return {name: write_tiny_vit(root, name) for name in BUILDERS}


@pytest.fixture(scope="session")
def embedded_vit():
    from featurekit.vision.models import load_vision_model

    return load_vision_model("dinov2-s-focus")
