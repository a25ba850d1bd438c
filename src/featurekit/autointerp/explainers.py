"""Explainers: one judge request per unit, one explanation back.

- `highlight` — the token-highlight explainer (OpenAI's neuron-explainer and delphi's default): the explanation
  set's excerpts with the active tokens marked <<…>> and listed with their activations on a 0–10 scale.
- `logits` — the logit-aware explainer (Neuronpedia's np_max-act-logits idea): the most active token of each
  top excerpt, the token after it, the output tokens the unit promotes (the store's top positive logit effects;
  for a control, the unembedding of its output direction) and the excerpts; answers in 1–6 words, "say X" for
  an output-side unit.

The answer's explanation is its last `[EXPLANATION]:` line, or the whole answer if it is one short line; any other
answer is unparseable: the unit gets no explanation and is counted (`prompts.parse_explanation`).
"""

from __future__ import annotations

from . import prompts
from .judges import Request

EXPLAINERS = ("highlight", "logits")


def request(explainer: str, record: dict, max_tokens: int) -> Request:
    if explainer == "highlight":
        return Request.of(prompts.explain_highlight(record["explain"]), max_tokens)
    if explainer == "logits":
        return Request.of(prompts.explain_logits(record["explain"], record.get("promoted") or []), max_tokens)
    raise ValueError(f"unknown explainer {explainer!r}; use one of {', '.join(EXPLAINERS)}")


def result(unit: int, response: dict) -> dict:
    text, how = prompts.parse_explanation(response.get("text", ""))
    return {"unit": int(unit), "explanation": text, "how": how, "answer": response.get("text", "")}
