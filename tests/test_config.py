import dataclasses
import json
import re
import typing

import pytest

from featurekit.config import RunConfig, did_you_mean, from_dict, load_config
from featurekit.errors import FeaturekitError


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("site: resid_post.3\ntrain:\n  lr: 0.01\n  epochs: 2\n")
    cfg = load_config(path, ["train.lr=1e-4", "dictionary.n_latents=64", "train.max_grad_norm=null"])
    assert cfg.site == "resid_post.3" and cfg.train.epochs == 2
    assert cfg.train.lr == 1e-4 and cfg.dictionary.n_latents == 64 and cfg.train.max_grad_norm is None
    assert cfg.model.name == RunConfig().model.name


def test_json_round_trip(tmp_path):
    cfg = load_config(None, ["name=x", "train.seed=3"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "config.json") == cfg
    assert from_dict(RunConfig, cfg.to_dict()) == cfg


def test_bad_keys_and_types_are_named():
    with pytest.raises(FeaturekitError, match="train.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(FeaturekitError, match="train.epochs must be int"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(FeaturekitError, match="key=value"):
        load_config(None, ["train.lr"])


def test_list_values_and_unknown_method_are_checked():
    from dataclasses import dataclass

    from featurekit.config import validate

    @dataclass
    class Holder:
        sizes: list[int] | None = None

    assert from_dict(Holder, {"sizes": [1, 2.0]}).sizes == [1, 2]
    with pytest.raises(FeaturekitError, match=r"sizes\[1\] must be int"):
        from_dict(Holder, {"sizes": [1, "x"]})
    with pytest.raises(FeaturekitError, match="must be a list"):
        from_dict(Holder, {"sizes": 3})
    with pytest.raises(FeaturekitError, match="dictionary.method must be one of .*topk"):
        validate(load_config(None, ["dictionary.method=nope"]))


@pytest.mark.parametrize("name,content,words", [
    ("c.yaml", b"train:\n\tlr: 0.001\n", "line 2, column 1: found character '\\t'"),
    ("c.yaml", b"train: !!python/object/apply:os.system ['true']\n", "never runs code from them): remove the tag"),
    ("c.yaml", b"train:\n  lr: 1\n  epochs: 2\n  lr: 2\n", "line 4, column 3: key 'lr' appears twice"),
    ("c.json", b'{"train": {"lr": 1, "lr": 2}}', "key 'lr' appears twice"),
    ("c.json", b'{"train": {"lr": ', "not valid JSON: Expecting value at line 1, column 18"),
    ("c.json", b"", "not valid JSON: Expecting value at line 1, column 1"),
    ("c.yaml", b"\x00\x01\x02binary", "binary file"),
    ("c.yaml", b"site: caf\xe9\n", "not UTF-8 text (byte 9, line 1)"),
])
def test_bad_config_files_name_the_file_and_the_place(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FeaturekitError, match=re.escape(f"config file {path}")) as caught:
        load_config(path)
    assert words in str(caught.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.01, epochs: 2}\n")
    with pytest.raises(FeaturekitError, match="unknown config key"):  # merge keys parse; `base` is simply unknown
        load_config(path)
    path.write_text("train:\n  <<: {lr: 0.01, epochs: 2}\n  lr: 0.5\n")
    assert load_config(path).train.lr == 0.5


@pytest.mark.parametrize("key,expected", [("learning_rate", "lr"), ("nlatents", "n_latents"), ("N_Latents", "n_latents"),
                                          ("epoch", "epochs"), ("batchsize", "batch_size"), ("zzz", None)])
def test_did_you_mean(key, expected):
    names = ["lr", "n_latents", "epochs", "batch_size", "k"]
    assert did_you_mean(key, names) == expected


@pytest.mark.parametrize("override,suggestion", [("train.learning_rate=1e-3", "train.lr"),
                                                 ("dictionary.nlatents=64", "dictionary.n_latents"), ("trian.lr=1", "train")])
def test_unknown_keys_suggest_the_near_miss_and_list_the_valid_ones(override, suggestion):
    with pytest.raises(FeaturekitError, match=rf"did you mean {re.escape(suggestion)}\?\); valid: \[") as caught:
        load_config(None, [override])
    assert f"'{suggestion}'" in str(caught.value) or suggestion == "train"


def test_an_unknown_key_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(FeaturekitError, match=rf"config file {re.escape(str(path))}: unknown .*did you mean train.lr"):
        load_config(path, ["name=x"])
    with pytest.raises(FeaturekitError, match=r"^unknown config key\(s\) train.lrr"):  # from --set: no file named
        load_config(None, ["train.lrr=1"])


def test_override_into_a_value_or_with_bad_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("site: resid_post.3\n")
    with pytest.raises(FeaturekitError, match="config key site is a value, not a section"):
        load_config(path, ["site.layer=3"])
    with pytest.raises(FeaturekitError, match=r"value of override 'train.lr=\[1,' is not valid YAML"):
        load_config(None, ["train.lr=[1,"])
    with pytest.raises(FeaturekitError, match="config key site must be str"):
        load_config(None, ["site={a: 1}"])


def float_keys(cls, where=""):
    """Every float-typed key of the config dataclass tree (float or float | None); the dictionary section's
    own keys are those of the default method (topk)."""
    from featurekit.config import DictionaryConfig
    from featurekit.dictionaries import METHODS

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if cls is DictionaryConfig and f.name == "params":
            yield from float_keys(METHODS[DictionaryConfig.method].Params, where)
        elif dataclasses.is_dataclass(hint):
            yield from float_keys(hint, f"{where}{f.name}.")
        elif float in (typing.get_args(hint) or (hint,)):
            yield where + f.name


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_every_float_key_must_be_finite(value):
    from featurekit.config import validate

    keys = list(float_keys(RunConfig))
    assert {"train.lr", "data.max_norm_multiple", "dictionary.threshold_decay", "train.aux_zipf_tau"} <= set(keys)
    for key in keys:
        cfg = load_config(None, [f"{key}={value}"])
        with pytest.raises(FeaturekitError, match=rf"config key {re.escape(key)} must be a finite number"):
            validate(cfg)
    validate(load_config(None, []))
