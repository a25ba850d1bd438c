"""Files that must never run code, and the Hub when it cannot be reached (the other bad files are rows of
tests/test_bad_inputs.py's table)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import featurekit
from featurekit.errors import FeaturekitError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "interop"


class RunsCode:
    """Unpickling this calls os.system: the attack a pickled ae.pt can carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_ae_pt_whose_pickle_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    folder = tmp_path / "trainer_0"
    shutil.copytree(FIXTURES / "dictionary_learning" / "topk" / "trainer_0", folder)
    state = torch.load(folder / "ae.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": RunsCode(marker)}, folder / "ae.pt")
    with pytest.raises(FeaturekitError, match="refused: featurekit never unpickles code") as err:
        featurekit.load(folder)
    assert str(folder / "ae.pt") in str(err.value)
    assert not marker.exists()


def test_an_unknown_folder_lists_the_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(FeaturekitError, match="SAELens.*sparsify.*Gemma Scope.*dictionary_learning"):
        featurekit.load(tmp_path)


def test_a_sparsify_run_folder_names_its_hookpoints(tmp_path):
    shutil.copytree(FIXTURES / "sparsify" / "sae", tmp_path / "run")
    with pytest.raises(FeaturekitError, match=r"one coder per hookpoint \['layers.6'\]"):
        featurekit.load(tmp_path / "run")
    assert featurekit.load(tmp_path / "run", subfolder="layers.6").method == "topk"


def test_hub_ids_offline_give_a_clear_error(tmp_path):
    """No Hub at test time: with HF_HUB_OFFLINE and an empty cache, hf: ids fail with a message saying what to do."""
    code = ("import featurekit, json\n"
            "try:\n    featurekit.load('hf:google/gemma-scope-2b-pt-res', subfolder='layer_6/width_16k/average_l0_71')\n"
            "except featurekit.errors.FeaturekitError as e:\n    print(json.dumps(str(e)))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    message = json.loads(done.stdout.strip().splitlines()[-1])
    assert "hf:google/gemma-scope-2b-pt-res" in message and "offline" in message and "pass the local folder" in message


def test_a_malformed_hub_id_is_refused():
    with pytest.raises(FeaturekitError, match="hf:ORG/REPO"):
        featurekit.load("hf:not-a-repo-id")
