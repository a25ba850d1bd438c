"""A run folder as a unit, through the real CLI on the tiny model: relocatable, one writer at a time, no
silent overwrite, stale temporary files swept, a rerun continues from what is complete, disk cleaned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from featurekit import rundir
from featurekit.cli import main

SETS = ["model.dtype=float32", "site=resid_post.1", "data.context_len=16", "data.train_tokens=3000", "data.shard_tokens=1000",
        "dictionary.n_latents=64", "dictionary.k=4", "train.batch_size=256", "train.buffer_tokens=1024", "train.epochs=2",
        "train.log_every=5", "train.checkpoint_every=4", "train.threads=1", "train.warmup_steps=2", "eval.tokens=600",
        "eval.splice_contexts=8", "eval.batch_contexts=8", "report.n_features=3"]


def args(tiny, out, name, *extra, text=None):
    sets = [f"out_dir={out}", f"name={name}", f"model.name={tiny / 'model'}", f"data.source={text or tiny / 'text.txt'}", *SETS, *extra]
    return [a for s in sets for a in ("--set", s)] + ["--quiet"]


def cli(capsys, *argv):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """One finished run (runs/done) made through the CLI, reused read-only by the tests below (they copy it)."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", *args(tiny, out, "done")]) == 0
    return out / "done"


def copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(rundir.LOCK))
    return dest


def test_commands_work_in_a_copied_run_folder_from_any_current_folder(finished, tmp_path, capsys, monkeypatch):
    backup = copy_run(finished, tmp_path / "backup" / "renamed")
    (backup / "eval.json").unlink()
    own = (finished / "eval.json").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli(capsys, "eval", os.path.relpath(backup, elsewhere), "--quiet")
    assert code == 0, err
    assert json.loads((backup / "eval.json").read_text())["complete"] is True  # written in the copy ...
    assert (finished / "eval.json").read_bytes() == own  # ... and not over the original
    assert not (elsewhere / "runs").exists()
    code, out, err = cli(capsys, "report", backup)
    assert code == 0 and (backup / "report.html").is_file() and "renamed" in (backup / "report.html").read_text()
    code, out, err = cli(capsys, "train", "--resume", backup, "--quiet")
    assert code == 0 and "already finished" in out


def test_a_new_config_under_a_used_name_is_refused_unless_overwrite(finished, tiny, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "r")
    before = (run / "dictionary" / "model.safetensors").read_bytes()
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "r", "dictionary.n_latents=32"))
    assert code == 2 and "already holds a run with another config" in err and "dictionary.n_latents: 64 → 32" in err
    assert (run / "dictionary" / "model.safetensors").read_bytes() == before
    assert json.loads((run / "config.json").read_text())["dictionary"]["n_latents"] == 64
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "r", "dictionary.n_latents=32"), "--overwrite")
    assert code == 0, err
    assert json.loads((run / "dictionary" / "featurekit.json").read_text())["n_latents"] == 32


def test_a_failed_check_leaves_no_run_folder(tiny, tmp_path, capsys):
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "bad", "site=resid_post.7"))
    assert code == 2 and "resid_post" in err and not (tmp_path / "bad").exists()
    code, out, err = cli(capsys, "train", *args(tiny, tmp_path, "bad2", text=tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err and not (tmp_path / "bad2").exists()


def test_a_finished_run_is_not_redone_and_a_killed_evaluation_is_redone_alone(finished, tiny, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "again")
    stamps = {p: (run / p).stat().st_mtime_ns for p in ("dictionary/model.safetensors", "activations/manifest.json", "eval.json")}
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "again"))
    assert code == 0, err
    assert "harvest and training skipped" in err and "evaluation skipped" in err
    assert all((run / p).stat().st_mtime_ns == t for p, t in stamps.items())
    partial = json.loads((run / "eval.json").read_text())
    del partial["complete"]  # as a kill during the feature examples leaves it
    (run / "eval.json").write_text(json.dumps(partial))
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "again"))
    assert code == 0 and "harvest and training skipped" in err and "evaluation skipped" not in err
    assert json.loads((run / "eval.json").read_text())["complete"] is True
    assert (run / "dictionary" / "model.safetensors").stat().st_mtime_ns == stamps["dictionary/model.safetensors"]


def test_clean_frees_the_cache_and_checkpoint_and_a_rerun_needs_neither(finished, tiny, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "c")
    kept = {p: (run / p).read_bytes() for p in ("dictionary/model.safetensors", "eval.json", "features/top_examples.json")}
    code, out, err = cli(capsys, "clean", run)
    assert code == 0 and "freed" in out and "MiB" in out
    assert not (run / "activations").exists() and not (run / "checkpoint").exists()
    assert all((run / p).read_bytes() == b for p, b in kept.items())
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "c"))
    assert code == 0 and "harvest and training skipped" in err and not (run / "activations").exists()


def test_clean_refuses_an_unfinished_run(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "u")
    shutil.rmtree(run / "dictionary")
    code, out, err = cli(capsys, "clean", run)
    assert code == 2 and "no finished dictionary" in err and (run / "checkpoint").exists()


def test_stale_temporary_files_are_swept_when_a_command_starts(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "s")
    stale = [run / "checkpoint" / ".state-000000004.safetensors.x1y2.tmp", run / "activations" / ".shard_00001.safetensors.ab.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1024)
    (run / ".dictionary.k3j4").mkdir()
    orphan = run / "checkpoint" / "state-000000002.safetensors"
    orphan.write_bytes(b"\0" * 1024)
    code, out, err = cli(capsys, "report", run)
    assert code == 0
    assert not any(p.exists() for p in [*stale, run / ".dictionary.k3j4", orphan])
    current = json.loads((run / "checkpoint" / "state.json").read_text())["tensors"]
    assert (run / "checkpoint" / current).is_file()


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "l")
    with rundir.locked(run, "train --name l"):
        code, out, err = cli(capsys, "eval", run, "--quiet")
    assert code == 2 and "in use by another featurekit process" in err and f"pid {os.getpid()}" in err
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from featurekit import rundir\n"
                               "with rundir.locked(Path(sys.argv[1]), 'run'):\n    print('held', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = cli(capsys, "report", run)
        assert code == 2 and f"pid {holder.pid}" in err and "`featurekit run`" in err
    finally:
        holder.kill()
        holder.wait()
    code, out, err = cli(capsys, "report", run)  # the kernel released the killed holder's lock
    assert code == 0, err


def test_a_writer_refused_while_the_holder_writes_its_name_still_names_it(tmp_path):
    """The holder takes the lock and then writes who it is; a second writer that comes in between must wait
    for the name rather than report "holder unknown" (CI caught that window once)."""
    import fcntl
    import threading
    run = tmp_path / "r"
    run.mkdir()
    fh = open(run / rundir.LOCK, "a+", encoding="utf-8")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    def write_name():
        time.sleep(0.3)
        fh.write(json.dumps({"pid": 4242, "host": "h", "command": "train x", "started": "now"}) + "\n")
        fh.flush()
    writer = threading.Thread(target=write_name)
    writer.start()
    try:
        with pytest.raises(rundir.FeaturekitError, match=r"pid 4242 on h, `featurekit train x`"):
            with rundir.locked(run, "eval"):
                pass
    finally:
        writer.join()
        fh.close()


def test_two_concurrent_trainings_of_one_run_one_is_refused(tiny, tmp_path):
    """Two real `featurekit train` processes started together on one run name: one trains, the other is
    refused at once (before this lock both exited 0 with interleaved metrics)."""
    harvest = subprocess.run([sys.executable, "-m", "featurekit", "harvest", *args(tiny, tmp_path, "cc", "train.epochs=30")],
                             capture_output=True, text=True, timeout=300)
    assert harvest.returncode == 0, harvest.stderr
    cmd = [sys.executable, "-m", "featurekit", "train", *args(tiny, tmp_path, "cc", "train.epochs=30")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the first finished before the second started: then they ran one after the other
        pytest.skip("the two processes did not overlap on this machine")
    assert codes == [0, 2], results
    assert any("in use by another featurekit process" in err and "featurekit train" in err for _, err in results)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cc" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: no interleaved or duplicated lines


def test_train_resume_before_the_first_checkpoint_starts_the_run(finished, tiny, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "k")
    shutil.rmtree(run / "dictionary")
    shutil.rmtree(run / "checkpoint")
    (run / "metrics.jsonl").unlink()
    code, out, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0 and "starts from step 0" in err
    a, b = load_file(run / "dictionary" / "model.safetensors"), load_file(finished / "dictionary" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)  # the same weights as the uninterrupted run (train.threads=1)


def test_an_edited_text_is_not_trained_on_from_the_old_cache(tiny, tmp_path, capsys):
    text = tmp_path / "my.txt"
    shutil.copy(tiny / "text.txt", text)
    code, out, err = cli(capsys, "harvest", *args(tiny, tmp_path, "edit", text=text))
    assert code == 0, err
    text.write_text(text.read_text().replace("cat", "dog", 5))
    for command in ("train", "harvest", "run"):
        code, out, err = cli(capsys, command, *args(tiny, tmp_path, "edit", text=text))
        assert code == 2 and f"the text of {text} changed" in err and "--overwrite" in err, (command, err)
    assert not (tmp_path / "edit" / "dictionary").exists()
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "edit", text=text), "--overwrite")
    assert code == 0, err


def test_one_document_fails_before_the_model_loads_and_contexts_holdout_runs_it(tiny, tmp_path, capsys):
    text = tmp_path / "one.txt"
    text.write_text(" ".join((tiny / "text.txt").read_text().split()))  # no blank line: one document
    start = time.time()
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "one", text=text))
    assert code == 2 and "separated by blank lines" in err and "data.holdout=contexts" in err
    assert not (tmp_path / "one").exists() and time.time() - start < 5
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "one", "data.holdout=contexts", text=text))
    assert code == 0, err
    assert json.loads((tmp_path / "one" / "eval.json").read_text())["n_tokens"] > 0


def test_small_evaluation_sets_and_long_warmups_are_warned_about(tiny, tmp_path, capsys):
    code, out, err = cli(capsys, "run", *args(tiny, tmp_path, "w", "train.warmup_steps=500"))
    assert code == 0, err
    assert "warmup_steps=500 exceeds the run's" in err
    assert "holds only" in err and "noisy" in err  # 600 held-out tokens
    assert "noisy" in json.loads((tmp_path / "w" / "eval.json").read_text())["warnings"][0]


def test_eval_on_other_text_writes_beside_the_runs_own_results(finished, tiny, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "o")
    own = (run / "eval.json").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(" ".join(["the", "big", "red", "fish", "sat"] * 8) for _ in range(30)))
    code, out, err = cli(capsys, "eval", run, "--text", other, "--quiet")
    assert code == 0, err
    result = json.loads((run / "evals" / "other-all" / "eval.json").read_text())
    assert result["source"] == str(other) and result["split"] == "all" and result["complete"]
    assert (run / "evals" / "other-all" / "features" / "top_examples.json").is_file()
    assert (run / "eval.json").read_bytes() == own
    code, out, err = cli(capsys, "eval", run, "--set", "dictionary.k=8")
    assert code == 2 and "may change only data.*" in err


def test_version_config_listing_and_report_outside_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("featurekit 0.")
    code, out, err = cli(capsys, "config")
    assert code == 0 and "train.lr = 0.002" in out and "data.holdout" in out and "jumprelu" in out
    code, out, err = cli(capsys, "report", tmp_path)
    assert code == 2 and "not a featurekit run folder" in err and not (tmp_path / "report.html").exists()


def test_random_sigkills_during_run_then_reruns_end_as_one_uninterrupted_run(tiny, tmp_path):
    """`featurekit run` killed at random moments (harvest, training, evaluation, report), rerun after each
    kill until it completes: the same dictionary bit for bit, a complete evaluation, no temporary files."""
    import random
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(name):
        return [sys.executable, "-m", "featurekit", "run", *args(tiny, tmp_path, name, "data.train_tokens=6000")]

    began = time.time()
    subprocess.run(command("ref"), env=env, check=True, capture_output=True, timeout=300)
    duration = time.time() - began
    rng = random.Random(17)
    kills = 0
    for trial in range(3):
        name = f"killed{trial}"
        for _ in range(3):  # up to three kills per trial, each at a random moment of a (re)run
            proc = subprocess.Popen(command(name), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.5, duration))
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        done = subprocess.run(command(name), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        a = load_file(tmp_path / "ref" / "dictionary" / "model.safetensors")
        b = load_file(tmp_path / name / "dictionary" / "model.safetensors")
        assert all((a[k] == b[k]).all() for k in a), name
        assert json.loads((tmp_path / name / "eval.json").read_text())["complete"]
        assert not [p for p in (tmp_path / name).rglob("*.tmp")]
    assert kills >= 3  # the schedule above did kill runs in flight


def test_an_evaluation_that_overflows_is_an_error_not_a_nan_result(finished, tmp_path, capsys):
    from safetensors.torch import save_file

    run = copy_run(finished, tmp_path / "nan")
    weights = run / "dictionary" / "model.safetensors"
    tensors = load_file(weights)
    tensors["W_dec"] = tensors["W_dec"].abs() + 3e38  # finite weights whose reconstruction overflows float32
    tensors["b_dec"] = tensors["b_dec"].abs() + 3e38
    save_file(tensors, weights)
    before = (run / "eval.json").read_bytes()
    code, out, err = cli(capsys, "eval", run, "--quiet")
    assert code == 2 and "non-finite" in err and "fvu" in err
    assert (run / "eval.json").read_bytes() == before
