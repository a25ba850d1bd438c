"""Excerpts as a judge reads them: a window of tokens, some marked like <<this>>.

A window is a JSON-able dict (`examples.py` builds them):

    {"context": int, "start": int, "tokens": [str], "acts": [float], "kind": str, "value": float, "peak": int, ...}

`acts` holds the unit's activation on every token of the window (0 where it is silent); `peak` is the index of
the largest. Marking follows delphi's explainer: a token is marked when its activation exceeds `MARK_FRACTION`
of the window's own maximum, so every activating window shows at least one mark.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

MARK_FRACTION = 0.3
OPEN, CLOSE = "<<", ">>"
# special-token text (a document separator in the store's token stream, e.g. SmolLM2's <|im_end|>): written
# verbatim into a prompt, a judge's tokenizer reads it as the special token itself and the excerpt ends the chat turn
SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?s>|<(?:bos|eos|pad|unk)>")
SPECIAL_SHOWN = "[document break]"


def clean(token: str) -> str:
    """A token as it is shown: line breaks and tabs made visible on one line; special-token text (`SPECIAL`) as
    SPECIAL_SHOWN."""
    return SPECIAL.sub(SPECIAL_SHOWN, token.replace("\r", "").replace("\n", "\\n").replace("\t", " "))


def plain(tokens: Sequence[str]) -> str:
    """The window's text, unmarked."""
    return "".join(clean(t) for t in tokens)


def marked(tokens: Sequence[str], marks: Iterable[int]) -> str:
    """The window's text with the tokens at `marks` between << >> (a run of marked tokens: one span; a leading
    space stays outside the span)."""
    marks = set(marks)
    out, inside = [], False
    for i, token in enumerate(tokens):
        text = clean(token)
        if i in marks and not inside:
            if text.startswith(" "):  # a word's leading space stays outside the mark: "the <<cat>>"
                out.append(" ")
                text = text[1:]
            out.append(OPEN)
            inside = True
        elif i not in marks and inside:
            out.append(CLOSE)
            inside = False
        out.append(text)
    if inside:
        out.append(CLOSE)
    return "".join(out)


def active_marks(acts: Sequence[float], fraction: float = MARK_FRACTION) -> list[int]:
    """Positions whose activation exceeds `fraction` of the window's maximum (none when it never fires)."""
    top = max(acts, default=0.0)
    if top <= 0:
        return []
    return [i for i, a in enumerate(acts) if a > 0 and a >= fraction * top]


def random_marks(n_tokens: int, count: int, rng: random.Random) -> list[int]:
    """`count` distinct random positions (sorted) of a window of n_tokens: the decoy marks of fuzzing."""
    count = max(1, min(count, n_tokens))
    return sorted(rng.sample(range(n_tokens), count))


def scaled(value: float, top: float) -> int:
    """An activation on OpenAI's neuron-explainer scale: an integer 0–10, 10 at `top`."""
    if top <= 0 or value <= 0:
        return 0
    return max(0, min(10, round(10 * value / top)))


def activation_list(window: dict, top: float, limit: int = 10) -> str:
    """'tok 10, tok 4': the marked tokens of a window with their 0–10 activations, at most `limit` of them."""
    pairs = [(clean(window["tokens"][i]).strip() or repr(window["tokens"][i]), scaled(window["acts"][i], top))
             for i in active_marks(window["acts"])[:limit]]
    return ", ".join(f"{t} {v}" for t, v in pairs)
