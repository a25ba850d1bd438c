import pytest

from .tiny_vit import write_tiny_vit


class _TinyVits(dict):
    """{name: folder} of tiny random HF vision models (tests/vision/tiny_vit.py), each written on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        self[name] = write_tiny_vit(self.root, name)
        return self[name]


@pytest.fixture(scope="session")
def tiny_vits(tmp_path_factory):
    return _TinyVits(tmp_path_factory.mktemp("tiny_vits"))


@pytest.fixture(scope="session")
def embedded_vit():
    from featurekit.vision.models import load_vision_model

    return load_vision_model("dinov2-s-focus")
