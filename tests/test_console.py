"""What `dcml` prints: one line for an error raised in a Ray task or a training worker, progress
lines where no bar can be drawn, the sweep's trial lines; Ray's own output only with -v.

The subprocess runs of `dcml train`, `tune`, `serve` and of jobs (test_training, test_tune,
test_serve_process, test_jobs) check that their output holds dcml's lines and none of Ray's."""

import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dcml import console
from dcml.cli import error_message, main
from dcml.data.errors import DataError
from dcml.storage import Storage

from .conftest import register_tiny_model


def test_an_error_raised_in_a_worker_or_a_task_is_one_line_naming_it(monkeypatch, capsys):
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    # rank 0 lost its connection to rank 1, whose own error is the cause
    failures = {0: RuntimeError("[gloo/pair.cc:537] Read error"), 1: DataError("f.csv: row 3")}
    crashed = WorkerGroupError("[Rank 0 Error Snippet]:\nTraceback (most recent...", failures)
    named = "training worker 1 failed (and 1 more): f.csv: row 3"
    assert error_message(crashed) == named
    bug = ControllerError(ZeroDivisionError("division by zero"))
    assert error_message(bug) == (
        "training failed: ZeroDivisionError: division by zero (DCML_DEBUG=1 shows the traceback)"
    )
    task = RayTaskError("read", "Traceback (most recent call last):\n  ...", DataError("bad.csv"))
    assert error_message(task.as_instanceof_cause()) == "bad.csv"
    assert error_message(ActorDiedError()).startswith("ActorDiedError: The actor died")
    assert error_message(ValueError("train.lr: must be > 0")) == "train.lr: must be > 0"
    assert error_message(ZeroDivisionError()) is None  # not the user's: a traceback

    def failed(*_):
        raise crashed

    monkeypatch.setattr("dcml.cli.config_of", failed)
    assert main(["report", "some-run"]) == 1
    assert capsys.readouterr().err == f"error: {named}\n"


def test_progress_is_a_line_now_and_then_where_no_bar_can_be_drawn(monkeypatch, capsys):
    monkeypatch.setattr(console, "EVERY_S", 0.0)
    lines: list[str] = []
    with console.Progress("reading", rows=300, parts=3, log=lines.append) as bar:
        for _ in range(3):
            bar.update(100)
    assert len(lines) == 3 and lines[-1].startswith("reading: 300/300 rows, "), lines
    assert lines[-1].endswith(" rows/s, 3/3 file(s)"), lines
    with console.Progress("scoring") as bar:  # no log, outside the `dcml` command: nothing
        bar.update(5)
    assert capsys.readouterr().out == ""
    console.enable()
    try:
        assert not console.drawn()  # pytest's capture: not a terminal
        with console.Progress("scoring") as bar:
            bar.update(5)
    finally:
        console.enable(False)
    out = capsys.readouterr().out  # under the `dcml` command: to stdout
    assert out.startswith("scoring: 5 rows, ") and out.endswith(" rows/s\n"), out


def test_a_sweep_prints_a_line_per_trial_that_ends(tmp_path, capsys):
    from dcml.tune import format_trials
    from dcml.tune_progress import TrialProgress

    progress = TrialProgress("val_roc_auc", ["train.lr"], 4, format_trials)
    pickle.loads(pickle.dumps(progress))  # Tune stores its callbacks with the sweep

    def trial(n: int) -> SimpleNamespace:
        return SimpleNamespace(
            trial_id=f"t{n}", config={"train.lr": 0.01 * n}, error_file=tmp_path / f"t{n}.txt"
        )

    console.enable()
    try:
        for n, epochs in ((1, 4), (2, 2)):
            progress.on_trial_start(0, [], trial(n))
            for epoch in range(epochs):
                result = {"epoch": epoch, "val_roc_auc": 0.5 + 0.1 * epoch}
                progress.on_trial_result(0, [], trial(n), result)
            progress.on_trial_complete(0, [], trial(n))
        failed = trial(3)  # Tune's text of its error
        failed.error_file.write_text("Failure # 1\nTraceback ...\nValueError: train.lr too high\n")
        progress.on_trial_start(0, [], failed)
        progress.on_trial_error(0, [], failed)
        progress.on_experiment_end([])
    finally:
        console.enable(False)
    assert capsys.readouterr().out.splitlines() == [
        "trial t1 finished after 4 epoch(s): val_roc_auc=0.8000 (train.lr=0.01)",
        "trial t2 stopped early after 2 epoch(s): val_roc_auc=0.6000 (train.lr=0.02)",
        "trial t3 failed after 0 epoch(s): ValueError: train.lr too high (train.lr=0.03)",
    ]


@pytest.mark.usefixtures("ray_session")
def test_a_failed_ray_task_is_one_line_and_verbose_shows_rays_own_output(tmp_path):
    """`dcml predict` on Ray Data (joined to this Ray) with a file that fails in its task: one
    line by default; with -v, Ray Data's logs and the task's traceback too."""
    import ray

    storage = Storage(str(tmp_path / "store"))
    ref = register_tiny_model(storage, tmp_path / "model")
    (tmp_path / "bad.csv").write_text("id,x,color\n1,1.0,red\n2,2.0,blue,extra\n")
    # what the session's prepare_env set for this process and its children: not for these
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_DATA_", "DCML_"))}
    dcml = Path(sys.executable).with_name("dcml")

    def predict(*flags: str) -> str:
        done = subprocess.run(
            [str(dcml), *flags, "predict", ref, "-i", str(tmp_path / "bad.csv")]
            + ["-o", str(tmp_path / f"out{len(flags)}"), "--set", f"storage.root={storage.root}"]
            + ["--set", f"cluster.address={ray.get_runtime_context().gcs_address}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode == 1, done.stdout + done.stderr
        return done.stdout + done.stderr

    quiet = predict()
    assert quiet.splitlines() == [
        f"error: {tmp_path / 'bad.csv'}: not a readable csv file: CSV parse error: "
        "Expected 3 columns, got 4: 2,2.0,blue,extra"
    ], quiet
    verbose = predict("-v")
    assert "Traceback" in verbose and "ERROR" in verbose, verbose[-3000:]
    assert verbose.splitlines()[-1] == quiet.strip()
