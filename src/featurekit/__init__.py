"""featurekit: find the interpretable features inside neural networks.

    import featurekit
    sae = featurekit.load("runs/default/dictionary")   # or a SAELens / sparsify / Gemma Scope / dictionary_learning file
    codes = sae.encode(activations)        # (n, d) raw activations → (n, F) sparse codes
    ids, keep = featurekit.tokenize(tokenizer, ["some text"], sae.metadata["special_tokens"])
"""

__version__ = "0.1.0"

from .data.tokens import tokenize  # noqa: E402
from .dictionaries import Dictionary, save  # noqa: E402
from .interop import load  # noqa: E402  (every format: featurekit's own, SAELens, sparsify, Gemma Scope, dictionary_learning)

__all__ = ["Dictionary", "load", "save", "tokenize", "__version__"]
