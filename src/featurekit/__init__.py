"""featurekit: find the interpretable features inside neural networks.

    import featurekit
    sae = featurekit.load("runs/default/dictionary")
    codes = sae.encode(activations)        # (n, d) raw activations → (n, F) sparse codes
"""

__version__ = "0.1.0"

from .dictionaries import Dictionary, load, save  # noqa: E402

__all__ = ["Dictionary", "load", "save", "__version__"]
