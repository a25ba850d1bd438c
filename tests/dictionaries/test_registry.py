"""The method registry is the one list of methods: every registered method has a Params dataclass whose
fields its constructor or fitter takes, documented keys, and a place in the README and docs/methods.md;
configs refuse keys a method does not take; a method registers itself with the decorator alone."""

import dataclasses
import inspect
from pathlib import Path

import pytest

from featurekit.config import DictionaryConfig, load_config, validate
from featurekit.config.help import describe, method_keys
from featurekit.dictionaries import METHODS, Dictionary, build_from_config, load, register, save
from featurekit.dictionaries.protocols import Fitter
from featurekit.errors import FeaturekitError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_documented_params_its_class_takes(name):
    cls = METHODS[name]
    assert cls.method == name and dataclasses.is_dataclass(cls.Params)
    accepted = set(inspect.signature(cls.__init__).parameters)
    fitter_accepted = set(inspect.signature(cls.fitter.__init__).parameters) if cls.fitter else set()
    for f in dataclasses.fields(cls.Params):
        assert f.name in accepted | fitter_accepted, f"{name}: Params.{f.name} is taken by neither the class nor its fitter"
    assert all(doc for _, _, doc in method_keys(name)), f"{name}: every key needs a #: comment"
    built = build_from_config(DictionaryConfig(name, 64), 8, d_out=8 if cls.transcodes else None)
    assert isinstance(built, cls)
    if cls.fitter is not None:
        assert isinstance(cls.fitter.from_config(DictionaryConfig(name, 64), 8, batch_size=64), Fitter)


def test_readme_and_docs_name_every_method():
    readme, docs = (REPO / "README.md").read_text(), (REPO / "docs" / "methods.md").read_text()
    for name in METHODS:
        assert f"`{name}`" in readme, f"README's method table lacks {name}"
        assert name in docs.lower(), f"docs/methods.md lacks {name}"
    text = describe()
    assert all(f"\n {name}:" in text for name in METHODS)


def test_a_key_the_method_does_not_take_is_refused_naming_its_keys():
    with pytest.raises(FeaturekitError, match=r"dictionary\.groups.*dictionary\.method=topk") as err:
        load_config(None, ["dictionary.groups=4"])
    assert "dictionary.k" in str(err.value)
    cfg = load_config(None, ["dictionary.method=gba", "dictionary.groups=4"])
    assert cfg.dictionary.params.groups == 4 and cfg.to_dict()["dictionary"]["groups"] == 4
    with pytest.raises(FeaturekitError, match=r"dictionary\.k=40 must lie in \[1, dictionary\.n_latents=32\]"):
        validate(load_config(None, ["dictionary.n_latents=32", "dictionary.k=40"]))


def test_a_config_round_trips_through_its_flat_dictionary_section(tmp_path):
    cfg = load_config(None, ["dictionary.method=jumprelu", "dictionary.l0_coefficient=2.5", "dictionary.n_latents=64"])
    path = tmp_path / "c.json"
    import json

    path.write_text(json.dumps(cfg.to_dict()))
    again = load_config(path)
    assert again == cfg and again.dictionary.params.l0_coefficient == 2.5


def test_a_new_method_needs_only_its_file(tmp_path):
    """A method defined and registered in one place is built from a config, saved and loaded."""

    @dataclasses.dataclass
    class ScaledReLUParams:
        scale: float = 2.0  #: multiplies the codes

    @register(ScaledReLUParams)
    class ScaledReLU(Dictionary):
        method = "scaledrelu_test"

        def __init__(self, d_in, n_latents, scale=2.0, seed=None):
            super().__init__(d_in, n_latents)
            self.scale = scale
            self.init_tied(seed)

        def activation(self, pre):
            return pre.relu() * self.scale

        def inference_rule(self):
            return {"activation": "scaled_relu", "scale": self.scale}

        def hyperparams(self):
            return {"scale": self.scale}

    try:
        cfg = load_config(None, ["dictionary.method=scaledrelu_test", "dictionary.scale=3", "dictionary.n_latents=16"])
        validate(cfg)
        sae = build_from_config(cfg.dictionary, 8, seed=0)
        loaded = load(save(sae, tmp_path / "d"))
        assert loaded.method == "scaledrelu_test" and loaded.scale == 3.0
    finally:
        del METHODS["scaledrelu_test"]
