"""What load_model does with a name that is not an embedded model or a local path: a Hub id is
fetched only when the Hub answers one quick probe; otherwise it fails at once with the forms a model
can take and the embedded names close to it (no retries: those took 28 s)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from featurekit.errors import FeaturekitError
from featurekit.models import load_model, loading


@pytest.fixture
def listening_port():
    """A loopback port that accepts connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


@pytest.fixture
def closed_port():
    """A loopback port where nothing listens (connections are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def online(monkeypatch):
    """No offline variable and no proxy: the Hub's reachability decides."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("offline", [True, False])
def test_cli_mistyped_model_fails_fast_without_traceback(tmp_path, offline):
    """The CLI as a user runs it, with HF_HUB_OFFLINE=1 and without it (the Hub is unreachable here
    and in CI; where it is reachable it answers 'not found' at once)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "featurekit.cli", "run", "--set", "model.name=smollm2",
                           "--set", f"out_dir={tmp_path / 'runs'}"], env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert "featurekit: error: could not load model 'smollm2'" in err
    assert "Did you mean 'smollm2-135m'?" in err
    assert "local HF directory" in err and ".gguf file" in err
    assert "Retry" not in err
    assert elapsed < 30, f"took {elapsed:.1f} s"  # ~4 s measured, mostly Python and torch imports


@pytest.mark.parametrize("name", ["smollm2", "smollm-135m", "SmolLM2-135M", "smollm2-135"])
def test_near_misses_suggest_the_embedded_name(name):
    with pytest.raises(FeaturekitError, match=r"HF_HUB_OFFLINE is set.*Did you mean 'smollm2-135m'\?"):
        load_model(name)


def test_a_distant_name_gets_no_suggestion_but_the_forms():
    with pytest.raises(FeaturekitError) as err:
        load_model("org/unrelated-model")
    message = str(err.value)
    assert "Did you mean" not in message
    assert "embedded model (smollm2-135m)" in message and "local HF directory" in message and ".gguf" in message


def test_unreachable_hub_reads_the_local_cache_only(online, monkeypatch, closed_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        raise OSError("not in the cache")

    start = time.monotonic()
    with pytest.raises(FeaturekitError, match=rf"not in the local Hugging Face cache \(the Hub at "
                                              rf"http://127.0.0.1:{closed_port} could not be reached"):
        loading.from_hub("smollm2", load)
    assert calls == [{"local_files_only": True}]
    assert time.monotonic() - start < 5


def test_reachable_hub_is_used_and_its_answer_reported(online, monkeypatch, listening_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listening_port}")
    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        raise OSError("smollm2 is not a valid model identifier")

    with pytest.raises(FeaturekitError, match=r"the Hugging Face Hub could not serve it \(OSError: smollm2 is not a "
                                              r"valid model identifier\)\. Did you mean 'smollm2-135m'\?"):
        loading.from_hub("smollm2", load)
    assert calls == [{}]
    assert loading.from_hub("org/model", lambda **kw: ("loaded", kw)) == ("loaded", {})


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_variables_skip_the_probe(online, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: pytest.fail("probed the Hub while offline"))
    assert loading._hub_unavailable() == f"{var} is set, so the Hub is not contacted: unset it to download"


def test_probe_opens_one_connection(listening_port, closed_port, online):
    assert loading.hub_reachable(f"http://127.0.0.1:{listening_port}")
    assert not loading.hub_reachable(f"http://127.0.0.1:{closed_port}")
    assert not loading.hub_reachable("not a url")


def test_probe_gives_up_after_its_timeout(online, monkeypatch):
    def silent_network(address, timeout):
        time.sleep(timeout)
        raise TimeoutError(f"no answer from {address}")

    monkeypatch.setattr(socket, "create_connection", silent_network)
    start = time.monotonic()
    assert not loading.hub_reachable("https://huggingface.co", timeout=0.3)
    assert time.monotonic() - start < 1.5


def test_probe_goes_through_the_proxy(online, monkeypatch, listening_port, closed_port):
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening_port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("NO_PROXY", "")
    assert loading.hub_reachable(f"https://127.0.0.2:{closed_port}")
