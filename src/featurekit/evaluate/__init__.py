"""Evaluation: pure metrics and evaluations that splice a dictionary into a model."""
