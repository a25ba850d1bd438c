"""Golden prompts: what each explainer and scorer sends for fixed excerpts, byte for byte; and the answer parsers
on the answers real judges give (marked, bare, chatty, malformed)."""

import pytest

from featurekit.autointerp import prompts
from featurekit.autointerp.text import clean, marked, random_marks

W1 = {"tokens": ["The", " cat", " sat", " on", " the", " mat", "."], "acts": [0, 0, 3.0, 0.5, 0, 1.2, 0], "peak": 2, "kind": "top"}
W2 = {"tokens": ["A", " dog", " ran", "\n", "home"], "acts": [0, 0, 1.5, 0, 0], "peak": 2, "kind": "band1"}


def test_highlight_explainer_prompt():
    messages = prompts.explain_highlight([W1, W2])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].endswith("End your answer with one line: [EXPLANATION]: <your explanation>")
    assert messages[0]["content"].startswith("You are studying one feature of a language model: a direction in its internal "
                                             "activations that is active on some tokens of some texts.")
    assert messages[2]["content"] == '[EXPLANATION]: the suffix "er" of comparative adjectives'
    # W1's 0.5 is below 30 % of its maximum 3.0: not marked; activations scaled by the largest (3.0) to 0-10
    assert messages[3]["content"] == ("Excerpt 1: The cat <<sat>> on the <<mat>>.\nActivations: sat 10, mat 4\n"
                                      "Excerpt 2: A dog <<ran>>\\nhome\nActivations: ran 5")


def test_logit_explainer_prompt():
    messages = prompts.explain_logits([W1, W2], [" down", " still"])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "PROMOTED OUTPUTS: the output tokens the feature makes more likely" in messages[0]["content"]
    assert messages[1]["content"] == ("MOST ACTIVE TOKENS: sat, ran\nNEXT TOKENS: on, \\n\nPROMOTED OUTPUTS: down, still\n"
                                      "EXCERPTS:\n1. The cat <<sat>> on the mat.\n2. A dog <<ran>>\\nhome")
    assert "PROMOTED OUTPUTS: (none known)" in prompts.explain_logits([W1], [])[1]["content"]


def test_scorer_prompts():
    one = prompts.detection("verbs of motion", ["The cat sat."])
    assert one == [
        {"role": "system", "content": "You check explanations of a language-model feature. You get the explanation and numbered "
                                      "text excerpts. For each excerpt, decide whether the feature as explained would be active "
                                      "somewhere in it: 1 for yes, 0 for no. Answer with the single digit 1 or 0 and nothing else."},
        {"role": "user", "content": "Explanation: verbs of motion\n\nExcerpt 1: The cat sat."}]
    two = prompts.fuzzing("verbs of motion", ["The cat <<sat>>.", "A <<dog>> ran"])
    assert two[0]["content"].endswith("Answer with a list of 2 digits in brackets, one per excerpt in order, like [1, 0], "
                                      "and nothing else.")
    assert two[1]["content"] == "Explanation: verbs of motion\n\nExcerpt 1: The cat <<sat>>.\nExcerpt 2: A <<dog>> ran"
    odd = prompts.intruder(["a <<b>>", "c <<d>>", "<<e>> f"])
    assert odd[0]["content"].endswith("Answer with the number of the odd excerpt and nothing else.")
    assert odd[1]["content"] == "Excerpt 1: a <<b>>\nExcerpt 2: c <<d>>\nExcerpt 3: <<e>> f"


def test_special_token_text_is_not_passed_to_the_judge():
    # the main job's store separates documents with SmolLM2's <|im_end|>: verbatim in a prompt, the judge's tokenizer
    # reads it as the end of the chat turn
    window = {"tokens": [" said", ".", "<|im_end|>", "Y", "ang", "tze", "</s>"], "acts": [0, 0, 0, 0, 2.0, 0, 0], "peak": 4}
    messages = prompts.explain_highlight([window])
    assert messages[3]["content"] == "Excerpt 1:  said.[document break]Y<<ang>>tze[document break]\nActivations: ang 10"
    for text in ("<|endoftext|>", "<|begin_of_text|>", "<s>", "<eos>", "<bos>", "<pad>"):
        assert clean(text) == "[document break]"
    assert clean("<<a|b>>") == "<<a|b>>" and clean("x < y | z > w") == "x < y | z > w"


def test_marks():
    assert marked(["a", " b", " c", "d"], [1, 2]) == "a <<b c>>d"
    assert marked(["a", "b"], []) == "ab"
    import random

    rng = random.Random(0)
    assert len(random_marks(10, 3, rng)) == 3 and random_marks(2, 5, rng) == [0, 1]


@pytest.mark.parametrize("answer,want", [
    ("The tokens are suffixes.\n[EXPLANATION]: the suffix \"er\".", ("the suffix \"er\"", "marked")),
    ("[EXPLANATION]: first\n[explanation]: second", ("second", "marked")),
    ("Words about rain", ("Words about rain", "bare")),
    ("Explanation: words about rain.", ("words about rain", "bare")),
    ("Line one\nLine two", (None, "unparseable")),
    ("", (None, "unparseable")),
    ("[EXPLANATION]:   ", (None, "unparseable")),
    (" ".join(["word"] * 31), (None, "unparseable")),
])
def test_parse_explanation(answer, want):
    assert prompts.parse_explanation(answer) == want


@pytest.mark.parametrize("answer,n,want", [
    ("1", 1, [1]), (" 0.", 1, [0]), ("Yes, it is.", 1, [1]), ("no", 1, [0]), ("1 1 1 1", 1, [1]),
    ("maybe", 1, None), ("10", 1, None), ("[1, 0, 1]", 3, [1, 0, 1]), ("Answer: [0,0]", 2, [0, 0]),
    ("[1, 0]", 3, None), ("1 0 1", 3, [1, 0, 1]), ("1 0", 3, None), ("[1, 2, 0]", 3, None),
])
def test_parse_binary(answer, n, want):
    assert prompts.parse_binary(answer, n) == want


@pytest.mark.parametrize("answer,want", [("3", 3), ("Excerpt 2 is odd", 2), ("6", None), ("none", None), ("0", None)])
def test_parse_choice(answer, want):
    assert prompts.parse_choice(answer, 5) == want


def test_tokens_explanation_names_the_most_frequent_peaks():
    from featurekit.autointerp.explainers import judge_free, tokens_explanation

    def rec(*peaks):
        return {"explain": [{"tokens": ["a", p, "b"], "peak": 1} for p in peaks]}

    assert tokens_explanation(rec(" inflation", " inflation")) == 'the token "inflation"'
    # most frequent first, ties in excerpt order (the stronger first), at most three, special tokens shown readably
    assert tokens_explanation(rec(" big", " huge", " huge", "<|im_end|>", " vast")) == \
        'the tokens "huge", "big", "[document break]"'
    assert tokens_explanation(rec(" ", "   ")) is None and tokens_explanation(rec("\n")) == 'the token "\\n"'
    assert judge_free(7, "tokens", rec(" ")) == {"unit": 7, "explanation": None, "how": "unparseable", "answer": ""}
