"""Models: loading (HF, local, GGUF, embedded), sites per architecture family, and hook contexts."""

from featurekit.models.identity import model_digest, tokenizer_digest
from featurekit.models.loading import LoadedModel, has_lm_head, load_model, load_model_config

__all__ = ["LoadedModel", "has_lm_head", "load_model", "load_model_config", "model_digest", "tokenizer_digest"]
