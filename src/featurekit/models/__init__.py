"""Models: loading (HF, local, GGUF, embedded), sites per architecture family, and hook contexts."""

from featurekit.models.loading import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
