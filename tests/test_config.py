import json

import pytest

from featurekit.config import RunConfig, from_dict, load_config
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
