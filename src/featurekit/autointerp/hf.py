"""A judge in this process: any causal LM featurekit.models loads (the embedded SmolLM2-135M-Instruct by default,
a local folder, a .gguf file, a Hub id), and the same model as the surprisal scorer's language model.

Prompts go through the tokenizer's chat template when it has one; otherwise they are written as a plain
transcript ("System: …\\n\\nUser: …\\n\\nAssistant:"). Decoding is greedy (the request's temperature is
ignored: an in-process judge is deterministic), and log-probabilities come from the model's own next-token
distribution at each generated position.

A multiple-choice question (a request with `choices`: the 1/0 of detection and fuzzing, the excerpt number of
the intruder test) is answered by the choice the model finds most probable as its answer (the sum of its
tokens' log-probabilities after the prompt; ties: the first choice), with every choice's log-probability
returned. A small model that would not keep to the answer format still answers, and its P(1) / (P(0) + P(1))
gives the AUC. HTTP judges generate their answers freely.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import FeaturekitError
from ..models import load_model
from ..models.identity import model_digest
from ..models.loading import has_lm_head
from .judges import Request


def transcript(messages: list[dict]) -> str:
    """The plain-text rendering of a chat for a tokenizer without a chat template."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts + ["Assistant:"])


class HFJudge:
    concurrency = 1

    def __init__(self, name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, loaded: Any = None) -> None:
        self.name = name
        self.loaded = loaded if loaded is not None else load_model(name, dtype=dtype, device=device)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        if not has_lm_head(self.model):
            raise FeaturekitError(f"the judge model {name!r} has no language-model head ({type(self.model).__name__}): "
                                  f"a judge must generate text; use a causal LM")
        self.digest = model_digest(self.model)
        self.label = str(name).rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
        self.device = next(self.model.parameters()).device
        # the last position's logits only, where the model can (a 150k-token vocabulary's head on every prompt
        # position is a quarter of a 0.5B model's compute)
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}

    def identity(self) -> dict:
        return {"kind": "in-process", "model": self.label, "weights": self.digest, "decoding": "greedy",
                "multiple_choice": "most probable choice"}

    def encode_chat(self, messages: list[dict]) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tok(transcript(messages), return_tensors="pt").input_ids
        return ids.to(self.device)

    @torch.inference_mode()
    def choose(self, request: Request) -> dict:
        """A multiple-choice answer (module docstring)."""
        ids = self.encode_chat(request.chat())
        options = [self.tokenizer(c, add_special_tokens=False).input_ids for c in request.choices]
        if all(len(o) == 1 for o in options):
            lp = torch.log_softmax(self.model(input_ids=ids, **self.keep_last).logits[0, -1].float(), dim=-1)
            scores = [float(lp[o[0]]) for o in options]
        else:  # several tokens: each choice read after the prompt, in one padded batch
            rows = [ids[0].tolist() + o for o in options]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id or 0
            batch = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
            lp = torch.log_softmax(self.model(input_ids=batch, attention_mask=mask).logits.float(), dim=-1)
            n = ids.shape[1]
            scores = [float(sum(lp[i, n - 1 + j, t] for j, t in enumerate(o))) for i, o in enumerate(options)]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return {"text": request.choices[best], "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": len(options[best])},
                "logprobs": [{"token": request.choices[best], "top": [[request.choices[i], round(scores[i], 6)] for i in ranked]}]}

    @torch.inference_mode()
    def complete(self, request: Request) -> dict:
        if request.choices:
            return self.choose(request)
        ids = self.encode_chat(request.chat())
        stop = self.tokenizer.eos_token_id
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.max_tokens, do_sample=False,
                                  temperature=None, top_p=None, top_k=None, output_scores=request.logprobs > 0,
                                  return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id or stop,
                                  eos_token_id=stop)
        new = out.sequences[0, ids.shape[1]:].tolist()
        if stop is not None and stop in new:
            new = new[:new.index(stop)]
        logprobs = None
        if request.logprobs > 0:
            logprobs = []
            for step, token in enumerate(new):
                lp = torch.log_softmax(out.scores[step][0].float(), dim=-1)
                top = torch.sort(lp, descending=True, stable=True)  # ties: the lower token id first, as greedy decoding
                logprobs.append({"token": self.tokenizer.decode([token]),
                                 "top": [[self.tokenizer.decode([int(i)]), round(float(v), 6)]
                                         for v, i in zip(top.values[:request.logprobs], top.indices[:request.logprobs])]})
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return {"text": text, "logprobs": logprobs, "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": len(new)}}


class LocalLM:
    """A causal LM's mean loss on texts after a prefix: the surprisal scorer's model."""

    def __init__(self, name: str, *, device: str = "cpu", loaded: Any = None, batch_size: int = 8) -> None:
        self.loaded = loaded if loaded is not None else load_model(name, device=device)
        if not has_lm_head(self.loaded.model):
            raise FeaturekitError(f"the surprisal model {name!r} has no language-model head: use a causal LM")
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.label = str(name).rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
        self.digest = model_digest(self.model)
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device

    @torch.inference_mode()
    def losses(self, prefix: str, texts: Sequence[str]) -> list[float]:
        """Mean next-token cross-entropy (nats) of each text's tokens, each read after `prefix`."""
        tok = self.tokenizer
        head = tok(prefix, return_tensors="pt").input_ids[0].tolist()
        bodies = [tok(t, add_special_tokens=False).input_ids or [tok.eos_token_id] for t in texts]
        out: list[float] = []
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for start in range(0, len(bodies), self.batch_size):
            chunk = bodies[start:start + self.batch_size]
            rows = [head + b for b in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            att = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                att[i, :len(r)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -lp.gather(-1, ids[:, 1:, None].to(self.device))[..., 0]
            for i, b in enumerate(chunk):
                first = len(head) - 1  # the prediction of the text's first token
                out.append(float(nll[i, first:first + len(b)].mean()))
        return out
