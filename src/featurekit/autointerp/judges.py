"""Judges: the language models that write explanations and answer the scorers' questions, behind one small
interface, and the replay cache in front of them.

    judge.identity() -> dict          what makes its answers what they are (the cache key's first half)
    judge.label                       a short name (folder names, the store's explainer column)
    judge.concurrency                 requests it may have in flight at once
    judge.complete(Request) -> dict   {"text", "logprobs": [{"token", "top": [[token, logprob], ...]}] | None,
                                       "usage": {"prompt_tokens", "completion_tokens"}}

Two kinds: `HTTPJudge` (`httpjudge.py`: any OpenAI-compatible chat-completions server — vLLM, llama.cpp's
llama-server, Ollama, `transformers serve`, a hosted API) and `HFJudge` (`hf.py`: a model featurekit.models
loads, in this process; default the embedded SmolLM2-135M-Instruct). `Asker` sends a batch of requests through
the cache (`cache.py`), with the judge's concurrency, and keeps the token accounting.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from ..errors import FeaturekitError
from .cache import ReplayCache, request_key

DEFAULT_JUDGE = "hf:smollm2-135m"


class JudgeError(FeaturekitError):
    """The judge could not answer (after its retries): the run stops; what it answered so far is in the cache."""


@dataclass(frozen=True)
class Request:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    max_tokens: int
    temperature: float = 0.0
    logprobs: int = 0  # top log-probabilities wanted per generated token (0: none)
    choices: tuple[str, ...] = ()  # the valid answers of a multiple-choice question (a judge may pick among them)

    @staticmethod
    def of(messages: list[dict], max_tokens: int, logprobs: int = 0, temperature: float = 0.0,
           choices: tuple[str, ...] = ()) -> Request:
        return Request(tuple((m["role"], m["content"]) for m in messages), int(max_tokens), float(temperature), int(logprobs),
                       tuple(choices))

    def chat(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def as_json(self) -> dict:
        out = {"messages": self.chat(), "max_tokens": self.max_tokens, "temperature": self.temperature, "logprobs": self.logprobs}
        if self.choices:
            out["choices"] = list(self.choices)
        return out


class Judge(Protocol):
    label: str
    concurrency: int

    def identity(self) -> dict: ...

    def complete(self, request: Request) -> dict: ...


@dataclass
class JudgeStats:
    """What a run asked of its judge: requests sent and answered from the cache, tokens both ways, seconds."""

    sent: int = 0
    replayed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replayed_prompt_tokens: int = 0
    replayed_completion_tokens: int = 0
    usage_missing: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, usage: dict | None, replayed: bool) -> None:
        with self.lock:
            p = int((usage or {}).get("prompt_tokens") or 0)
            c = int((usage or {}).get("completion_tokens") or 0)
            if replayed:
                self.replayed += 1
                self.replayed_prompt_tokens += p
                self.replayed_completion_tokens += c
            else:
                self.sent += 1
                self.prompt_tokens += p
                self.completion_tokens += c
                self.usage_missing += usage is None or "prompt_tokens" not in usage

    def as_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}


class Asker:
    """A judge behind the replay cache (None: no cache), with its token accounting in `stats`."""

    def __init__(self, judge: Any, cache: ReplayCache | None) -> None:
        self.judge, self.cache, self.stats = judge, cache, JudgeStats()
        self.identity = judge.identity()

    def ask(self, requests: list[Request]) -> list[dict]:
        """The answers to `requests`, in order: from the cache where it has them, else from the judge (up to its
        concurrency at once; each answer cached as it arrives). A JudgeError stops the batch (the answers already
        received stay cached) and propagates."""
        out: list[dict | None] = [None] * len(requests)
        keys = [request_key(self.identity, r.as_json()) for r in requests]
        missing = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                out[i] = hit
                self.stats.add(hit.get("usage"), replayed=True)
            else:
                missing.append(i)
        if missing:
            start = time.perf_counter()
            try:
                if getattr(self.judge, "concurrency", 1) <= 1 or len(missing) == 1:
                    for i in missing:
                        out[i] = self._one(requests[i], keys[i])
                else:
                    self._parallel(requests, keys, missing, out)
            finally:
                with self.stats.lock:
                    self.stats.seconds += time.perf_counter() - start
        return out  # type: ignore[return-value]

    def _one(self, request: Request, key: str) -> dict:
        response = self.judge.complete(request)
        if self.cache is not None:
            self.cache.put(key, self.identity, request.as_json(), response)
        self.stats.add(response.get("usage"), replayed=False)
        return response

    def _parallel(self, requests: list[Request], keys: list[str], missing: list[int], out: list) -> None:
        pool = ThreadPoolExecutor(max_workers=self.judge.concurrency, thread_name_prefix="featurekit-judge")
        try:
            futures = {pool.submit(self._one, requests[i], keys[i]): i for i in missing}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()
            for f, i in futures.items():
                out[i] = f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def make_judge(spec: str | None = None, *, model: str | None = None, api_key_env: str | None = None, concurrency: int = 4,
               timeout: float = 120.0, retries: int = 3, logprobs: bool = True, extra_body: dict | None = None, device: str = "cpu",
               loaded: Any = None) -> Any:
    """A judge from a spec: an http(s):// base URL of an OpenAI-compatible server (`model` names the served model;
    the key, if any, is read from the environment variable `api_key_env`), or `hf:NAME` / a bare NAME: a model
    featurekit.models loads in this process (embedded name, local folder, .gguf file, Hub id)."""
    spec = spec or DEFAULT_JUDGE
    if spec.startswith(("http://", "https://")):
        from .httpjudge import HTTPJudge

        return HTTPJudge(spec, model=model, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                         retries=retries, logprobs=logprobs, extra_body=extra_body)
    from .hf import HFJudge

    return HFJudge(spec.removeprefix("hf:"), device=device, loaded=loaded)
