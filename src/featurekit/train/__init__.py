"""Training: one gradient trainer for every dictionary, shared losses, schedules, checkpoints."""

from .trainer import Trainer

__all__ = ["Trainer"]
