"""The explorer's test bed: a tiny random Llama whose tokenizer keeps HTML-injection strings and mixed scripts as
whole tokens, a text full of them, six tiny runs over it (TopK, AbsTopK — signed, on the same site: the
cross-run neighbours —, a transcoder, SNMF, TopK on attention heads, ITDA), and `featurekit serve` over them as a real subprocess on an
ephemeral loopback port."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "</span><b>bold</b>", "{{7*7}}", "&amp;lt;"]
WORDS = "the a cat dog sat ran on under mat home far big small red green bird fish tree river day night".split()
SCRIPTS = ["Привет", "日本語", "مرحبا", "שלום", "🙂", "e\u0301te", "Ελλάδα"]
VOCAB = ["[UNK]", "<pad>", "<bos>", "<eos>", " "] + XSS + WORDS + SCRIPTS


def write_xss_tiny(root: Path) -> Path:
    """root/model (random Llama, word-level tokenizer over VOCAB: every string of XSS and SCRIPTS is one token,
    spaces are tokens, so decoded contexts read exactly as the text) and root/text.txt."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(re.escape(x) for x in XSS) + r"|\S+|\s"), behavior="isolated")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=2, eos_token_id=3, pad_token_id=1))
    model.save_pretrained(root / "model")
    hf_tok.save_pretrained(root / "model")
    rng = random.Random(0)
    pool = WORDS * 3 + XSS + SCRIPTS
    paragraphs = [" ".join(rng.choice(pool) for _ in range(rng.randint(15, 40))) for _ in range(400)]
    (root / "text.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    return root


RUNS = {  # name → config overrides
    "topk": ["site=resid_post.1", "dictionary.method=topk", "dictionary.k=4"],
    "abstopk": ["site=resid_post.1", "dictionary.method=abstopk", "dictionary.k=4"],
    "transcoder": ["site=mlp_in.1", "dictionary.method=transcoder", "dictionary.k=4", "train.lr=1e-2"],
    "snmf": ["site=mlp_hidden.1", "dictionary.method=snmf", "dictionary.n_latents=32", "dictionary.sparsity=0.1",
             "dictionary.passes=2"],
    "attn": ["site=attn_z.1", "dictionary.method=topk", "dictionary.k=4"],
    "itda": ["site=resid_post.1", "dictionary.method=itda", "dictionary.k=4", "dictionary.threshold=0.002", "dictionary.n_latents=256"],
}


@pytest.fixture(scope="session")
def xss_tiny(tmp_path_factory) -> Path:
    return write_xss_tiny(tmp_path_factory.mktemp("xss_tiny"))


@pytest.fixture(scope="session")
def app_runs(xss_tiny, tmp_path_factory) -> dict[str, Path]:
    """name → run folder, every run complete with its feature store."""
    from featurekit import pipeline
    from featurekit.config import load_config

    out = tmp_path_factory.mktemp("app_runs")
    runs = {}
    for name, extra in RUNS.items():
        cfg = pipeline.resolve(load_config(None, [
            f"out_dir={out}", f"name={name}", f"model.name={xss_tiny / 'model'}", "model.dtype=float32",
            f"data.source={xss_tiny / 'text.txt'}", "data.context_len=32", "data.train_tokens=4000", "data.shard_tokens=2000",
            "dictionary.n_latents=64", "train.batch_size=256", "train.buffer_tokens=1024", "train.epochs=2", "train.log_every=5",
            "eval.tokens=600", "eval.splice_contexts=8", "eval.batch_contexts=8", "report.n_features=3",
            "features.tokens=3000", "features.top_n=5", "train.threads=1", *extra]))
        pipeline.run_all(cfg, progress=False)
        runs[name] = cfg.run_dir
    return runs


GRAPH_PROMPT = "the cat sat on " + XSS[0] + " the"


@pytest.fixture(scope="session")
def graph_files(xss_tiny, app_runs, tmp_path_factory) -> dict[str, Path]:
    """Graph files for `serve --graphs`: "tiny" (traced through random transcoders at layers 0 and 2 and the
    `transcoder` run's dictionary at layer 1, so its layer-1 features link to that run's pages) and "bare" (the
    same graph with no edges and an extra feature node whose latent no transcoder has)."""
    import json

    from featurekit.circuits import transcoder_set
    from featurekit.circuits.trace import trace
    from featurekit.models.loading import load_model

    from ..circuits.helpers import random_set

    out = tmp_path_factory.mktemp("graphs")
    model = str(xss_tiny / "model")
    transcoder_set.save(random_set(), out / "set", model=model)
    tset = transcoder_set.from_folders([out / "set" / "layer_0", app_runs["transcoder"] / "dictionary", out / "set" / "layer_2"])
    trace(load_model(model), tset, GRAPH_PROMPT, out=out / "tiny.json", node_threshold=0.995, edge_threshold=0.99)
    doc = json.loads((out / "tiny.json").read_text(encoding="utf-8"))
    doc["links"] = []
    doc["nodes"].append({**next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"),
                         "node_id": "1_999_2", "jsNodeId": "1_999-0", "ctx_idx": 2, "activation": 1.5})
    (out / "bare.json").write_text(json.dumps(doc), encoding="utf-8")
    return {"tiny": out / "tiny.json", "bare": out / "bare.json"}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """path → (size, mtime_ns) of everything under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, runs: dict[str, Path], before: dict, log: list[str]) -> None:
        self.proc, self.url, self.runs, self.before, self.log = proc, url, runs, before, log


def start_serve(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`python -m featurekit serve ARGS --port 0` as a subprocess: (process, its http://127.0.0.1:PORT, its output lines)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "featurekit", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url, lines, deadline = None, [], time.monotonic() + 300  # generous: only a hang guard (imports alone take minutes on a loaded machine)
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        url = found.group(1) if found else None
    if url is None:
        proc.kill()
        pytest.fail("featurekit serve did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # keep the pipe drained
    return proc, url, lines


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def server(app_runs, graph_files) -> Server:
    """`python -m featurekit serve` over every run of `app_runs` and the graphs of `graph_files`, on a free loopback port."""
    before = {name: snapshot(path) for name, path in app_runs.items()}
    proc, url, lines = start_serve(*map(str, app_runs.values()), "--graphs", *map(str, graph_files.values()))
    yield Server(proc, url, app_runs, before, lines)
    stop(proc)
