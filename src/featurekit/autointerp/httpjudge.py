"""A judge behind any OpenAI-compatible chat-completions endpoint (stdlib HTTP: nothing to install).

    POST {base}/chat/completions  {"model", "messages", "max_tokens", "temperature", ["seed"], ["logprobs": true,
                                   "top_logprobs": k]}

Works with vLLM (`vllm serve M` → http://127.0.0.1:8000/v1), llama.cpp (`llama-server -m M.gguf` →
http://127.0.0.1:8080/v1), Ollama (http://127.0.0.1:11434/v1), `transformers serve` and hosted APIs. A base
URL without a path gets `/v1`. Each request has `timeout` seconds (connect, and each read); a refused or dropped
connection, a timeout, HTTP 408/409/429 or 5xx, or an answer that is not a chat completion is retried `retries`
times with exponential back-off (0.5 s, 1 s, 2 s … capped at 30 s, with jitter); any other HTTP error (a wrong
model name, a bad key) fails at once with the server's message. Servers that ignore `logprobs` (transformers
serve) simply return none: the scorers then report no AUC. `extra_body` adds server-specific fields to every
request (vLLM's `top_k`, `chat_template_kwargs`, …); it is part of the judge's identity.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from .judges import JudgeError, Request

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _Retry(Exception):
    """A failure worth another try."""


class HTTPJudge:
    def __init__(self, base_url: str, *, model: str | None = None, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 120.0, retries: int = 3, logprobs: bool = True, seed: int | None = 0,
                 backoff: float = 0.5, backoff_max: float = 30.0, extra_body: dict | None = None) -> None:
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.netloc:
            raise JudgeError(f"judge URL {base_url!r} is not an http(s) URL like http://127.0.0.1:8000/v1")
        self.base = base_url.rstrip("/") + ("/v1" if url.path in ("", "/") else "")
        self.key = None
        if api_key_env:
            self.key = os.environ.get(api_key_env)
            if not self.key:
                raise JudgeError(f"the judge's API key variable {api_key_env} is not set (or empty): export it, or drop "
                                 f"--api-key-env for a server without keys")
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise JudgeError(f"judge settings out of range: concurrency {concurrency} (>= 1), retries {retries} (>= 0), "
                             f"timeout {timeout} (> 0)")
        self.concurrency, self.timeout, self.retries = int(concurrency), float(timeout), int(retries)
        self.logprobs, self.seed, self.backoff, self.backoff_max = bool(logprobs), seed, float(backoff), float(backoff_max)
        self.extra_body = dict(extra_body or {})
        self.model = model or self._only_model()
        self.label = self.model.rstrip("/").rsplit("/", 1)[-1]
        self.retried = 0
        self._lock = threading.Lock()

    def identity(self) -> dict:
        """The served model's name and the settings that change answers (not the URL: the same model served
        elsewhere replays the same cache)."""
        return {"kind": "openai-chat", "model": self.model, "seed": self.seed, "logprobs": self.logprobs, **(
            {"extra_body": self.extra_body} if self.extra_body else {})}

    # -- one request ----------------------------------------------------------------------------------
    def complete(self, request: Request) -> dict:
        body = {**self.extra_body, "model": self.model, "messages": request.chat(), "max_tokens": request.max_tokens,
                "temperature": request.temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        if request.logprobs and self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = request.logprobs
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retried += 1
                delay = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
                time.sleep(delay * (1 + 0.25 * random.random()))
            try:
                return self._answer(self._post("/chat/completions", body))
            except _Retry as err:
                last = str(err)
        raise JudgeError(f"the judge at {self.base} did not answer after {self.retries + 1} tries ({last}); the answers "
                         f"received so far are in the replay cache: rerun when the server is back")

    def _post(self, path: str, body: dict) -> dict:
        return self._call(urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="POST",
                                                 headers=self._headers()))

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        return headers

    def _call(self, req: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = _snippet(err.read())
            if err.code in RETRY_STATUS:
                raise _Retry(f"HTTP {err.code}: {detail}") from err
            raise JudgeError(f"the judge at {self.base} refused the request: HTTP {err.code} {err.reason}: {detail}") from err
        except TimeoutError as err:
            raise _Retry(f"no answer within {self.timeout:g} s") from err
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, TimeoutError):
                raise _Retry(f"no answer within {self.timeout:g} s") from err
            raise _Retry(f"cannot connect: {reason}") from err
        except (ConnectionError, http.client.HTTPException, OSError) as err:
            raise _Retry(f"connection lost: {type(err).__name__}: {err}") from err
        try:
            return json.loads(raw)
        except ValueError as err:
            raise _Retry(f"the answer is not JSON: {_snippet(raw)}") from err

    @staticmethod
    def _answer(data: dict) -> dict:
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise _Retry(f"the answer is not a chat completion: {_snippet(json.dumps(data).encode())}") from err
        content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        logprobs = None
        if content:
            logprobs = [{"token": t.get("token", ""), "top": [[x.get("token", ""), x.get("logprob")] for x in t.get("top_logprobs") or []]}
                        for t in content]
        usage = data.get("usage") or None
        if usage is not None:
            usage = {"prompt_tokens": int(usage.get("prompt_tokens") or 0), "completion_tokens": int(usage.get("completion_tokens") or 0)}
        return {"text": text, "logprobs": logprobs, "usage": usage}

    def _only_model(self) -> str:
        """The server's model when it serves exactly one (GET /models); else an error asking for --judge-model."""
        try:
            data = self._call(urllib.request.Request(self.base + "/models", headers=self._headers()))
            names = [m["id"] for m in data.get("data", [])]
        except (_Retry, JudgeError, KeyError, TypeError, AttributeError) as err:
            raise JudgeError(f"name the judge's model with --judge-model (could not list the models at {self.base}: {err})") from err
        if len(names) != 1:
            raise JudgeError(f"the server at {self.base} serves {len(names)} models ({', '.join(names[:8]) or 'none listed'}): "
                             f"name one with --judge-model")
        return names[0]


def _snippet(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
