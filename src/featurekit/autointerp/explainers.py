"""Explainers: one judge request per unit, one explanation back.

- `highlight` — the token-highlight explainer (OpenAI's neuron-explainer and delphi's default): the explanation
  set's excerpts with the active tokens marked <<…>> and listed with their activations on a 0–10 scale.
- `logits` — the logit-aware explainer (Neuronpedia's np_max-act-logits idea): the most active token of each
  top excerpt, the token after it, the output tokens the unit promotes (the store's top positive logit effects;
  for a control, the unembedding of its output direction) and the excerpts; answers in 1–6 words, "say X" for
  an output-side unit.
- `tokens` — no judge: the explanation names the explanation set's most active tokens, the most frequent first
  (`the token "inflation"`; `the tokens "biggest", "broad", "comic"`). A baseline: what the scorers and the controls
  give for an explanation that carries the unit's top tokens and nothing else (the "token" baseline of explanation
  studies). It never fails to parse; units whose peaks are all blank tokens get none.

The answer's explanation is its last `[EXPLANATION]:` line, or the whole answer if it is one short line; any other
answer is unparseable: the unit gets no explanation and is counted (`prompts.parse_explanation`).
"""

from __future__ import annotations

from collections import Counter

from . import prompts
from .judges import Request
from .text import clean

EXPLAINERS = ("highlight", "logits", "tokens")
JUDGE_FREE = ("tokens",)  #: explainers that ask no judge
TOKENS_SHOWN = 3  #: most frequent peak tokens a `tokens` explanation names


def tokens_explanation(record: dict) -> str | None:
    """The `tokens` explainer's explanation: the explanation set's peak tokens, the most frequent first (ties: the
    stronger excerpt first), at most TOKENS_SHOWN of them, each once; None if every peak token is blank."""
    peaks = [clean(w["tokens"][int(w["peak"])]).strip() for w in record["explain"]]
    counts = Counter(t for t in peaks if t)
    first = {t: i for i, t in reversed(list(enumerate(peaks)))}
    shown = sorted(counts, key=lambda t: (-counts[t], first[t]))[:TOKENS_SHOWN]
    if not shown:
        return None
    quoted = ", ".join(f'"{t}"' for t in shown)
    return f"the token {quoted}" if len(shown) == 1 else f"the tokens {quoted}"


def request(explainer: str, record: dict, max_tokens: int) -> Request:
    if explainer == "highlight":
        return Request.of(prompts.explain_highlight(record["explain"]), max_tokens)
    if explainer == "logits":
        return Request.of(prompts.explain_logits(record["explain"], record.get("promoted") or []), max_tokens)
    raise ValueError(f"unknown judge explainer {explainer!r}; use one of {', '.join(e for e in EXPLAINERS if e not in JUDGE_FREE)}")


def judge_free(unit: int, explainer: str, record: dict) -> dict:
    """The explanation of a judge-free explainer (`tokens`), in `result`'s form."""
    if explainer != "tokens":
        raise ValueError(f"{explainer!r} is not a judge-free explainer ({', '.join(JUDGE_FREE)})")
    text = tokens_explanation(record)
    return {"unit": int(unit), "explanation": text, "how": "tokens" if text else "unparseable", "answer": ""}


def result(unit: int, response: dict) -> dict:
    text, how = prompts.parse_explanation(response.get("text", ""))
    return {"unit": int(unit), "explanation": text, "how": how, "answer": response.get("text", "")}
