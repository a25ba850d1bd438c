"""Evaluation: pure metrics and evaluations a user runs on a dictionary or a model (experiment drivers live in `bench`)."""

from .mlp_topk import mlp_sparsity_eval
from .steering import direction_logit_effect, feature_direction, feature_logit_effect, steer

__all__ = ["direction_logit_effect", "feature_direction", "feature_logit_effect", "mlp_sparsity_eval", "steer"]
