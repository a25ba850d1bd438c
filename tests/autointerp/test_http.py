"""The HTTP judge against a real OpenAI-compatible server: `transformers serve` on a loopback port, offline,
serving a tiny local judge model that answers "1 1 1 …" (judge_models.py; each served model runs in a process
of its own, which takes seconds to start, so one model serves every test). Round trips with token accounting;
a whole `explain_run` through it; answers that do not parse (a list of 3 labels asked, 20 digits given) are
counted; a paused server times out (retries with
back-off, then a clear error); a request the server rejects fails at once; a server killed mid-run stops the run
with the answers so far in the replay cache, and the rerun against a restarted server asks only for the rest
and gives the same files as an uninterrupted run."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from featurekit.autointerp import Asker, JudgeError, Request, explain_run
from featurekit.autointerp.cache import ReplayCache
from featurekit.autointerp.httpjudge import HTTPJudge

from .conftest import small

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("openai") is None,
                                 reason="transformers serve needs transformers[serving]: pip install featurekit[autointerp]")]
UNITS = [1, 6, 7]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`transformers serve` in its own process group, on a fixed loopback port (so it can be restarted there)."""

    def __init__(self, log: Path, models: list[Path]) -> None:
        self.port, self.log, self.models, self.proc = free_port(), log, models, None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        exe = Path(sys.executable).parent / "transformers"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
                                          "--log-level", "warning"], env=env, stdout=fh, stderr=fh, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("transformers serve did not start: " + self.log.read_text()[-3000:])
        for model in self.models:  # load each model now (the first request for a model loads it: seconds)
            HTTPJudge(self.url, model=str(model), timeout=120, retries=0).complete(Request.of([{"role": "user", "content": "hi"}], 1))

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(judges, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve") / "serve.log", [judges["constant"]])
    srv.start()
    yield srv
    srv.stop()


def settings():
    return small(scorers=("detection", "fuzzing", "intruder"))


def results(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.json"))
            if "cache" not in p.relative_to(out).parts}


def test_round_trip_and_token_accounting(server, judges, tmp_path):
    judge = HTTPJudge(server.url, model=str(judges["constant"]), concurrency=3)
    asker = Asker(judge, ReplayCache(tmp_path / "cache"))
    reqs = [Request.of([{"role": "user", "content": f"question {i}"}], 4, logprobs=5) for i in range(5)]
    answers = asker.ask(reqs)
    assert [a["text"] for a in answers] == ["1 1 1 1"] * 5
    assert all(a["logprobs"] is None for a in answers)  # transformers serve ignores logprobs (no AUC from it)
    st = asker.stats
    assert st.sent == 5 and st.completion_tokens == 20 and st.prompt_tokens == sum(a["usage"]["prompt_tokens"] for a in answers) > 0
    again = Asker(judge, ReplayCache(tmp_path / "cache"))
    assert again.ask(reqs) == answers and again.stats.sent == 0 and again.stats.replayed == 5
    assert HTTPJudge(server.url).model == str(judges["constant"])  # the only model served: no need to name it


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, server, judges, tmp_path_factory):
    out = tmp_path_factory.mktemp("http") / "whole"
    judge = HTTPJudge(server.url, model=str(judges["constant"]), concurrency=4)
    summary = explain_run(tiny_run, ids=UNITS, judge=judge, out=out, settings=settings(), progress=False, write_to_store=False)
    return out, summary


def test_explain_through_the_server(uninterrupted):
    out, summary = uninterrupted
    d = summary["explainers"]["highlight"]["scores"]["detection"]
    assert summary["explainers"]["highlight"]["explained"] == len(UNITS)
    assert d["balanced_accuracy"]["mean"] == 0.5 and d["unparsed_answers"] == 0 and d["auc"]["n"] == 0
    assert summary["requests"]["sent"] > 0 and summary["requests"]["completion_tokens"] > 0
    assert summary["judge"]["kind"] == "openai-chat" and summary["judge"]["label"] == "constant"


def test_malformed_answers_are_counted(tiny_run, server, judges, tmp_path):
    judge = HTTPJudge(server.url, model=str(judges["constant"]), concurrency=4)
    three = small(scorers=("detection", "fuzzing"))
    three.scoring.n_shown = 3  # asks for "[a, b, c]"; the judge says "1 1 1 … 1" (20 digits): not an answer
    summary = explain_run(tiny_run, ids=UNITS[:2], judge=judge, out=tmp_path / "three", settings=three, progress=False,
                          write_to_store=False)
    for s in summary["explainers"]["highlight"]["scores"].values():
        assert s["unparsed_answers"] == s["answers"] > 0 and s["balanced_accuracy"]["n"] == 0
    assert json.loads((tmp_path / "three" / "scores" / "highlight@constant" / "detection" / f"{UNITS[0]:07d}.json").read_text()
                      )["replies"][0].startswith("1 1 1 1")  # the raw answers are kept


def test_a_paused_server_times_out(server, judges):
    judge = HTTPJudge(server.url, model=str(judges["constant"]), timeout=1.0, retries=1, backoff=0.05)
    server.signal(signal.SIGSTOP)
    try:
        start = time.perf_counter()
        with pytest.raises(JudgeError, match=r"did not answer after 2 tries \(no answer within 1 s\)"):
            judge.complete(Request.of([{"role": "user", "content": "hello"}], 2))
        assert 2.0 <= time.perf_counter() - start < 10 and judge.retried == 1
    finally:
        server.signal(signal.SIGCONT)


def test_a_rejected_request_fails_at_once(server, judges):
    judge = HTTPJudge(server.url, model=str(judges["constant"]), retries=3, extra_body={"no_such_field": 1})
    start = time.perf_counter()
    with pytest.raises(JudgeError, match="refused the request: HTTP 422"):
        judge.complete(Request.of([{"role": "user", "content": "hello"}], 2))
    assert judge.retried == 0 and time.perf_counter() - start < 5


def test_server_dies_mid_run_and_the_rerun_resumes_from_the_cache(tiny_run, server, judges, uninterrupted, tmp_path):
    whole, first = uninterrupted
    out = tmp_path / "cut"
    judge = HTTPJudge(server.url, model=str(judges["constant"]), concurrency=4, retries=1, backoff=0.05, timeout=10)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            explain_run(tiny_run, ids=UNITS, judge=judge, out=out, settings=settings(), progress=False, write_to_store=False)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            failure.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive() and len(ReplayCache(out / "cache")) < 10:
        time.sleep(0.01)
    server.stop()
    thread.join(120)
    assert failure and isinstance(failure[0], JudgeError), failure
    assert "replay cache" in str(failure[0])
    cached = len(ReplayCache(out / "cache"))
    total = first["requests"]["sent"] + first["requests"]["replayed"]
    assert 10 <= cached < total
    server.start()
    summary = explain_run(tiny_run, ids=UNITS, judge=judge, out=out, settings=settings(), progress=False, write_to_store=False)
    assert summary["requests"]["replayed"] >= cached - len(list((out / "explanations").rglob("0*.json")))
    assert summary["requests"]["sent"] + summary["requests"]["replayed"] < total + 1
    assert results(out) == results(whole)
    log = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(log) == 1  # the interrupted invocation wrote no summary line
