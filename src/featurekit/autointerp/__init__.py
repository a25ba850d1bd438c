"""Automated interpretability: explain a run's features with a language model and score the explanations.

    from featurekit.autointerp import explain_run, Settings
    summary = explain_run("runs/default", n_units=32)                       # the embedded SmolLM2 as judge
    summary = explain_run("runs/default", judge="http://127.0.0.1:8000/v1")   # any OpenAI-compatible server
    summary = explain_run("runs/default", units="mlp_hidden.6")               # control: the model's MLP neurons
    summary = explain_run("runs/default", units="random")                     # control: random directions

Stages (each resumable, artefacts under RUN_DIR/autointerp/UNITS/): pool → examples → explanations → scores →
summary.json, and the explanations into the feature store. docs/autointerp.md describes the prompts, scorers,
judges and the replay cache.
"""

from .examples import ExampleSettings
from .judges import Asker, JudgeError, Request, make_judge
from .metrics import bootstrap_ci, classification_metrics, roc_auc
from .run import Settings, explain_run
from .scorers import SCORERS, ScoreSettings

__all__ = ["SCORERS", "Asker", "ExampleSettings", "JudgeError", "Request", "ScoreSettings", "Settings", "bootstrap_ci",
           "classification_metrics", "explain_run", "make_judge", "roc_auc"]
