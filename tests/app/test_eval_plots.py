"""The run overview shows the evaluation suite's results: each evals/NAME.json's metrics (escaped) and its plot,
served as /r/RUN/evals/NAME.png for the known evaluation names only (no other file of the run, no path)."""

from __future__ import annotations

import asyncio
import json
import shutil

from featurekit.app.runs import Runs
from featurekit.app.server import create_app
from featurekit.evaluate.plots import write_plot

XSS = "<script>alert(1)</script>"


def get(app, path: str) -> tuple[int, dict, bytes]:
    """One GET through the ASGI app in-process: (status, headers, body)."""
    raw_path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": raw_path, "raw_path": raw_path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, body


def probing_result() -> dict:
    metrics = {"sae": {"sae_test_accuracy": 0.9, "sae_top_1_test_accuracy": 0.7, "sae_top_5_test_accuracy": 0.8},
               "llm": {"llm_test_accuracy": 0.95, "llm_top_1_test_accuracy": 0.6, "llm_top_5_test_accuracy": 0.75},
               "pca": {"pca_top_1_test_accuracy": 0.65, XSS: 0.5}}
    return {"eval_type_id": "sparse_probing", "eval_config": {"site": "resid_post.1", "model_name": "tiny"},
            "eval_result_metrics": metrics, "eval_result_details": [{"dataset_name": XSS}],
            "sae_cfg_dict": {"architecture": "topk"}}


def test_the_overview_shows_each_evaluation_and_its_plot(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "evals").mkdir(exist_ok=True)
    result = probing_result()
    (run / "evals" / "sparse_probing.json").write_text(json.dumps(result))
    paths = write_plot(result, run / "evals" / "sparse_probing")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 1000 for p in paths)
    (run / "evals" / "absorption_first_letter.json").write_text(json.dumps({"eval_type_id": "absorption_first_letter",
                                                                           "eval_result_metrics": {"mean": {}}}))  # no plot
    app = create_app(Runs([run]))

    status, headers, body = get(app, "/r/run/")
    page = body.decode()
    assert status == 200 and "content-security-policy" in headers
    assert '<img class="evalplot" src="/r/run/evals/sparse_probing.png"' in page
    assert "absorption_first_letter" in page and "/r/run/evals/absorption_first_letter.png" not in page
    assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # a metric name from the file, escaped
    assert "0.95" in page

    status, headers, body = get(app, "/r/run/evals/sparse_probing.png")
    assert status == 200 and headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
    for bad in ("/r/run/evals/absorption_first_letter.png", "/r/run/evals/config.png", "/r/run/evals/..%2Fconfig.png",
                "/r/run/evals/%2E%2E.png"):
        status, _, body = get(app, bad)
        assert status == 404, bad
