"""Run configuration: plain dataclasses, loadable from YAML/JSON, overridable from the CLI.

The defaults are the main job (`make run`). A run directory keeps the fully resolved config in
`config.json`; `featurekit run --config runs/NAME/config.json` reproduces the run.
Overrides use dotted keys: `train.lr=1e-3`, `dictionary.n_latents=8192`, `site=resid_post.8`; the
dictionary section takes the chosen method's own keys (`dictionary.k=32` for topk,
`dictionary.l0_coefficient=2` for jumprelu; `featurekit config` lists them).

    schema   the sections (dataclasses; `#:` comments document each key)
    files    reading YAML/JSON config files strictly
    parse    plain data → RunConfig (overrides, types, unknown keys, the dictionary section, format v1)
    checks   `validate`: ranges, choices, finiteness, the method's own checks
    help     `featurekit config`: every key with its default and meaning
"""

from .checks import validate
from .files import read_config_file
from .parse import dictionary_from_dict, did_you_mean, from_dict, load_config, non_finite
from .schema import DataConfig, DictionaryConfig, EvalConfig, FeaturesConfig, ModelConfig, ReportConfig, RunConfig, TrainConfig

__all__ = [
    "DataConfig", "DictionaryConfig", "EvalConfig", "FeaturesConfig", "ModelConfig", "ReportConfig", "RunConfig", "TrainConfig",
    "dictionary_from_dict", "did_you_mean", "from_dict", "load_config", "non_finite", "read_config_file", "validate",
]
