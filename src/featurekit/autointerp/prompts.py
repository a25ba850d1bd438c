"""Every prompt a judge sees, and the parsers of its answers. Chat messages ({role, content}); the wording is
featurekit's own, after the formats of OpenAI's neuron-explainer (activations on a 0–10 scale), delphi
(<<marked>> tokens, the `[EXPLANATION]:` answer line, detection / fuzzing / intruder questions) and
Neuronpedia's np_max-act-logits explainer (most active tokens, next tokens, promoted output tokens).
docs/autointerp.md shows each prompt in full; tests/autointerp/test_prompts.py pins them.

A parser returns None for an answer it cannot read: the caller counts it as unparseable, never drops it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .text import activation_list, active_marks, clean, marked

VERSION = 2  #: part of every stage's identity: reworded prompts never mix with answers to the old ones
EXPLANATION_LINE = "[EXPLANATION]:"
MAX_BARE_WORDS = 30  # an answer without the [EXPLANATION]: line is accepted as the explanation when it is one short line

EXPLAIN_SYSTEM = (
    "You are studying one feature of a language model: a direction in its internal activations that is active on "
    "some tokens of some texts. You will see excerpts of text where the feature is active. In each excerpt the tokens "
    "where it is most active are marked like <<this>> (a run of marked tokens is one span). Below each excerpt the "
    "marked tokens are listed with the feature's activation on each, scaled from 0 to 10 (10: its strongest "
    "activation in these excerpts).\n"
    "Find what the marked tokens have in common, taking the surrounding words into account, and give one short "
    "explanation (at most 15 words) of what the feature responds to. Do not mention the marks, and do not list "
    "several guesses.\n"
    f"End your answer with one line: {EXPLANATION_LINE} <your explanation>"
)
# a worked example shown before the real question (one shot keeps small judges in the answer format)
EXPLAIN_SHOT_USER = (
    "Excerpt 1: the ocean is wid<<er>> than the\nActivations: er 9\n"
    "Excerpt 2: she grew tall<<er>> every year\nActivations: er 6\n"
    "Excerpt 3: the hole was small<<er>> but deep<<er>>\nActivations: er 10, er 8"
)
EXPLAIN_SHOT_ANSWER = f"{EXPLANATION_LINE} the suffix \"er\" of comparative adjectives"

LOGITS_SYSTEM = (
    "You are studying one feature of a language model. You get four lists about it:\n"
    "MOST ACTIVE TOKENS: the token where the feature is most active, in each of its top excerpts.\n"
    "NEXT TOKENS: the token that follows each of those.\n"
    "PROMOTED OUTPUTS: the output tokens the feature makes more likely when it is active.\n"
    "EXCERPTS: its top excerpts, the most active token marked like <<this>>.\n"
    "Describe the feature in 1 to 6 words. If the most active tokens are the same word or share something specific, "
    "name it. Otherwise, if the next tokens or the promoted outputs share a pattern, say what the feature makes the "
    "model say next, as \"say X\". Otherwise describe the theme of the excerpts.\n"
    f"End your answer with one line: {EXPLANATION_LINE} <your explanation>"
)

DETECTION_SYSTEM = (
    "You check explanations of a language-model feature. You get the explanation and numbered text excerpts. For "
    "each excerpt, decide whether the feature as explained would be active somewhere in it: 1 for yes, 0 for no."
)
FUZZING_SYSTEM = (
    "You check explanations of a language-model feature. You get the explanation and numbered text excerpts in which "
    "some tokens are marked like <<this>>. For each excerpt, decide whether the marked tokens are the ones the "
    "explanation describes: 1 if the marks are correct, 0 if they are not."
)
ONE_ANSWER = "Answer with the single digit 1 or 0 and nothing else."
INTRUDER_SYSTEM = (
    "You will see numbered text excerpts with some tokens marked like <<this>>. In all excerpts but one, the marked "
    "tokens have something in common (a word, a meaning, a grammatical role or a context). In one excerpt, the odd "
    "one out, they do not fit. Answer with the number of the odd excerpt and nothing else."
)


def list_answer(n: int) -> str:
    example = ", ".join(["1", "0", "0", "1", "0"][:n] + ["0"] * max(0, n - 5))
    return f"Answer with a list of {n} digits in brackets, one per excerpt in order, like [{example}], and nothing else."


# -- explainers ---------------------------------------------------------------------------------------------
def explain_highlight(windows: Sequence[dict]) -> list[dict]:
    """The token-highlight explainer's messages: each excerpt with its marked tokens and their 0–10 activations
    (scaled by the largest activation among the excerpts)."""
    top = max((max(w["acts"], default=0.0) for w in windows), default=0.0)
    lines = []
    for i, w in enumerate(windows, 1):
        lines.append(f"Excerpt {i}: {marked(w['tokens'], active_marks(w['acts']))}")
        lines.append(f"Activations: {activation_list(w, top)}")
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": EXPLAIN_SHOT_USER}, {"role": "assistant", "content": EXPLAIN_SHOT_ANSWER},
            {"role": "user", "content": "\n".join(lines)}]


def explain_logits(windows: Sequence[dict], promoted: Sequence[str]) -> list[dict]:
    """The logit-aware explainer's messages (Neuronpedia's np_max-act-logits idea): the most active token of each
    excerpt, the token after it, the feature's promoted output tokens and the excerpts."""
    most, after, excerpts = [], [], []
    for i, w in enumerate(windows, 1):
        p = int(w["peak"])
        most.append(clean(w["tokens"][p]).strip() or repr(w["tokens"][p]))
        nxt = w["tokens"][p + 1] if p + 1 < len(w["tokens"]) else None
        after.append("(end)" if nxt is None else clean(nxt).strip() or repr(nxt))
        excerpts.append(f"{i}. {marked(w['tokens'], [p])}")
    shown = ", ".join(clean(t).strip() or repr(t) for t in promoted) or "(none known)"
    user = (f"MOST ACTIVE TOKENS: {', '.join(most)}\nNEXT TOKENS: {', '.join(after)}\nPROMOTED OUTPUTS: {shown}\n"
            "EXCERPTS:\n" + "\n".join(excerpts))
    return [{"role": "system", "content": LOGITS_SYSTEM}, {"role": "user", "content": user}]


def parse_explanation(answer: str) -> tuple[str | None, str]:
    """(explanation, how): from the last `[EXPLANATION]:` line ("marked"); else the whole answer when it is one
    line of at most MAX_BARE_WORDS words ("bare"); else (None, "unparseable")."""
    hits = re.findall(r"\[EXPLANATION\]\s*:?\s*(.*)", answer or "", flags=re.IGNORECASE)
    how = "marked"
    if hits:
        text = hits[-1]
    else:
        lines = [line for line in (answer or "").strip().splitlines() if line.strip()]
        if len(lines) != 1 or len(lines[0].split()) > MAX_BARE_WORDS:
            return None, "unparseable"
        text, how = lines[0], "bare"
    text = re.sub(r"^(explanation|answer)\s*:\s*", "", text.strip(), flags=re.IGNORECASE).strip().strip("\"'`").strip()
    text = text.rstrip(".").strip()
    return (text, how) if text else (None, "unparseable")


# -- scorers ---------------------------------------------------------------------------------------------------
def _numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"Excerpt {i}: {t}" for i, t in enumerate(texts, 1))


def detection(explanation: str, texts: Sequence[str]) -> list[dict]:
    """Detection: unmarked excerpts; is the feature active in each?"""
    answer = ONE_ANSWER if len(texts) == 1 else list_answer(len(texts))
    return [{"role": "system", "content": f"{DETECTION_SYSTEM} {answer}"},
            {"role": "user", "content": f"Explanation: {explanation}\n\n{_numbered(texts)}"}]


def fuzzing(explanation: str, texts: Sequence[str]) -> list[dict]:
    """Fuzzing: marked excerpts (right marks on activating ones, decoys on the others); are the marks right?"""
    answer = ONE_ANSWER if len(texts) == 1 else list_answer(len(texts))
    return [{"role": "system", "content": f"{FUZZING_SYSTEM} {answer}"},
            {"role": "user", "content": f"Explanation: {explanation}\n\n{_numbered(texts)}"}]


def intruder(texts: Sequence[str]) -> list[dict]:
    """Intruder (no explanation): which excerpt is the odd one out?"""
    return [{"role": "system", "content": INTRUDER_SYSTEM}, {"role": "user", "content": _numbered(texts)}]


_BINARY = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0}


def parse_binary(answer: str, n: int) -> list[int] | None:
    """n 0/1 labels from an answer: one answer → its first word if that is 1/0/yes/no/true/false; several → a
    bracketed list of exactly n 0/1 items, or exactly n standalone 0/1 digits. None otherwise."""
    text = (answer or "").strip().lower()
    if n == 1:
        m = re.match(r"^\W*(1|0|yes|no|true|false)\b", text)
        return [_BINARY[m.group(1)]] if m else None
    bracket = re.search(r"\[([^\[\]]*)\]", text)
    if bracket:
        items = [s.strip().strip("'\"") for s in bracket.group(1).split(",") if s.strip()]
        if len(items) == n and all(s in ("0", "1") for s in items):
            return [int(s) for s in items]
        return None
    digits = re.findall(r"(?<![\w.])[01](?![\w.])", text)
    return [int(d) for d in digits] if len(digits) == n else None


def parse_choice(answer: str, n: int) -> int | None:
    """The excerpt number (1..n) an answer names first; None if it names none or one out of range."""
    m = re.search(r"\d+", answer or "")
    if not m:
        return None
    k = int(m.group(0))
    return k if 1 <= k <= n else None


def binary_probabilities(logprobs: Sequence[dict] | None, n: int) -> list[float] | None:
    """P(1) / (P(0) + P(1)) at each of the first n generated positions whose token is 0 or 1, from the judge's
    top log-probabilities there (delphi's AUC mode; "yes"/"no" count as 1/0). `logprobs`: per generated token
    {"token", "top": [[token, logprob], ...]}. None when the judge gave none or fewer than n such positions."""
    if not logprobs:
        return None
    out = []
    for position in logprobs:
        if position["token"].strip().lower() not in _BINARY:
            continue
        p = {0: 0.0, 1: 0.0}
        for token, lp in position.get("top") or []:
            label = _BINARY.get(token.strip().lower())
            if label is not None and lp is not None:
                p[label] += math.exp(lp)
        if p[0] + p[1] <= 0:
            return None
        out.append(p[1] / (p[0] + p[1]))
        if len(out) == n:
            return out
    return None
