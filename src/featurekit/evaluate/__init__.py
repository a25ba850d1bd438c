"""Evaluation: pure metrics and evaluations that splice a dictionary into a model."""

from .mlp_sparsity import mlp_sparsity_eval, run_mlp_sparsity
from .steering import feature_direction, feature_logit_effect, steer

__all__ = ["feature_direction", "feature_logit_effect", "mlp_sparsity_eval", "run_mlp_sparsity", "steer"]
