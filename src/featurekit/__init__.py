"""featurekit: find the interpretable features inside neural networks.

    import featurekit
    sae = featurekit.load("runs/default/dictionary")
    codes = sae.encode(activations)        # (n, d) raw activations → (n, F) sparse codes
    ids, keep = featurekit.tokenize(tokenizer, ["some text"], sae.metadata["special_tokens"])
"""

__version__ = "0.1.0"

from .data.tokens import tokenize  # noqa: E402
from .dictionaries import Dictionary, load, save  # noqa: E402

__all__ = ["Dictionary", "load", "save", "tokenize", "__version__"]
