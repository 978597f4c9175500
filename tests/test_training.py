"""Training on a real local Ray: determinism, streamed data, a lost worker and a lost driver,
resume by run id, fine-tuning."""

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from dcml.data.preprocess import preprocess
from dcml.data.synth import synth_table
from dcml.layout import META, WEIGHTS
from dcml.pipeline import resumed_config, stage_register, stage_train
from dcml.storage import Storage
from dcml.train.checkpoint import read_history

from .conftest import PNG, make_config, preprocessed, quiet, start_dcml, write_shards

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="module")
def bc(tmp_path_factory):
    """The bundled breast-cancer data, preprocessed once for the module."""
    return preprocessed(tmp_path_factory.mktemp("training") / "store")


def history(run_dir: Path) -> list[dict]:
    timings = ("epoch_s", "train_s", "time")
    return [{k: v for k, v in h.items() if k not in timings} for h in read_history(str(run_dir))]


@pytest.fixture(scope="module")
def two_runs(bc):
    """Two runs of one config with the same seed and workers (DDP, each worker caching its slice
    of the split: the default): their outcomes. The first is the fine-tuning test's base model."""
    root, dv = bc
    cfg = make_config(root, name="bcft", train={"epochs": 3})
    _, first = stage_train(cfg, dv.ref, run_id="same-a", log=quiet)
    _, second = stage_train(cfg, dv.ref, run_id="same-b", log=quiet)
    return cfg, first, second


def test_same_seed_and_workers_give_the_same_metrics_and_a_run_writes_test_eval_and_plots(
    bc, two_runs
):
    root, dataset = bc
    cfg, first, second = two_runs
    runs = root / "runs"
    assert len(history(runs / "same-a")) == 3
    assert history(runs / "same-a") == history(runs / "same-b")
    assert first.test_metrics == second.test_metrics
    assert first.test_metrics["test_roc_auc"] > 0.97
    # per-epoch validation loss next to the training loss
    assert all("val_loss" in h and "train_loss" in h for h in history(runs / "same-a"))

    stored = Storage.from_config(cfg).read_json(str(runs / "same-a" / "test_metrics.json"))
    assert stored["roc_auc"] == first.test_metrics["test_roc_auc"]
    # permutation importance on the validation split, per raw input: the breast-cancer model
    # leans on some of its 30 inputs, and shuffling them costs ROC AUC
    importance = json.loads((runs / "same-a" / "feature_importance.json").read_text())
    assert set(importance) == set(dataset.preprocessor.inputs) and max(importance.values()) > 0
    assert importance == json.loads((runs / "same-b" / "feature_importance.json").read_text())
    names = ("learning_curves.png", "roc_curve.png", "calibration.png", "confusion_matrix.png")
    for name in (*names, "feature_importance.png"):
        image = (runs / "same-a" / "plots" / name).read_bytes()
        assert image.startswith(PNG) and len(image) > 5_000, name


def checkpoint_epochs(run_dir: Path) -> list[int]:
    storage_metas = [p / META for p in run_dir.glob("checkpoint_*") if (p / META).exists()]
    return sorted(yaml.safe_load(m.read_text())["epoch"] for m in storage_metas)


def train_workers() -> list[psutil.Process]:
    """Ray Train workers of this test session's Ray only (its processes descend from this one):
    never another Ray cluster's on the same machine."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_a_run_survives_a_killed_worker_and_resumes_by_run_id_after_its_driver_dies(tmp_path):
    """`dcml train` (a real CLI process joined to this Ray; 2 DDP workers, train.max_failures 2):
    one training worker is SIGKILLed after the run's 2nd checkpoint and Ray Train restarts the
    workers from the last checkpoint; then the driver is SIGKILLed, and the same run id resumed
    goes on from its last checkpoint instead of starting over."""
    write_shards(tmp_path / "raw", synth_table(8_000, 0, 0), 4)
    epochs = 8
    raw = {
        "storage": {"root": str(tmp_path / "store")},
        "data": {"name": "resume", "source": str(tmp_path / "raw")},
        "model": {"depth": 2, "width": 64},
        "train": {
            "workers": 2,
            "epochs": epochs,
            "batch_size": 16,
            "keep_checkpoints": epochs,
            "max_failures": 2,
        },
    }
    cfg = make_config(tmp_path / "store", **{k: v for k, v in raw.items() if k != "storage"})
    dv = preprocess(cfg, Storage.from_config(cfg), log=quiet)
    proc = start_dcml(tmp_path, raw, "train", "--run-id", "r1", "--no-register")
    run_dir = tmp_path / "store" / "runs" / "r1"

    def wait_for_checkpoints(n: int) -> None:
        deadline = time.time() + 300
        while time.time() < deadline and len(checkpoint_epochs(run_dir)) < n:
            assert proc.poll() is None, (tmp_path / "dcml.log").read_text()
            time.sleep(0.1)

    try:
        wait_for_checkpoints(2)
        victims = train_workers()
        assert victims, "no Ray Train worker process found"
        killed_at = len(checkpoint_epochs(run_dir))
        victims[0].kill()  # SIGKILL: a worker lost mid-run
        wait_for_checkpoints(killed_at + 2)  # the restarted workers train on
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # then the driver is gone: its run's actors with it
        proc.wait()
    done_before = checkpoint_epochs(run_dir)
    assert killed_at + 2 <= len(done_before) < epochs, done_before
    # the rank-0 worker's epoch lines, printed as the driver's own; none of Ray's own output
    # (its C++ logs, Ray Data's bars in the workers, the raylet's note of the killed worker)
    shown = (tmp_path / "dcml.log").read_text().splitlines()
    assert any(line.startswith(f"epoch 1/{epochs} train_loss=") for line in shown), shown
    ray_own = ("pid=", "core_worker", "(raylet)", "WARNING", "Warning", "Traceback", "Dataset")
    assert [line for line in shown if any(r in line for r in ray_own)] == [], shown
    # the restart went on from a checkpoint: epoch 0 ran (and was checkpointed) once
    assert done_before.count(0) == 1, done_before

    with pytest.raises(ValueError, match="--resume r1"):
        stage_train(cfg, dv.ref, run_id="r1", log=quiet)  # never silently restarts a run
    lines: list[str] = []
    resumed = resumed_config(cfg, "r1")
    assert resumed.train.epochs == epochs and resumed.model.width == 64
    _, outcome = stage_train(resumed, None, "r1", lines.append, resume=True)

    assert any(line.startswith("resuming") for line in lines)
    # It went on from a checkpoint: epoch 0 ran once (an epoch whose checkpoint was being
    # stored at a kill may run again), and the history holds every epoch once.
    done = checkpoint_epochs(run_dir)
    assert set(done) == set(range(epochs)) and done.count(0) == 1, done
    assert [int(h["epoch"]) for h in history(run_dir)] == list(range(epochs))
    assert outcome.metrics["val_roc_auc"] > 0.8


def test_fine_tuning_loads_a_registered_model_and_freezes_its_first_layers(bc, two_runs):
    root, dv = bc
    base, trained, _ = two_runs
    source = stage_register(base, dv, trained.checkpoint_path, {}, ["production"], log=quiet)

    # the fine-tuned run, with another seed
    tuned_cfg = make_config(
        root,
        name="bcft",
        seed=1,
        train={
            "workers": 2,
            "epochs": 2,
            "lr": 0.01,
            "init_from": "bcft@production",
            "freeze_layers": 1,
        },
    )
    _, tuned = stage_train(tuned_cfg, dv.ref, run_id="tuned", log=quiet)
    assert [int(h["epoch"]) for h in history(root / "runs" / "tuned")] == [0, 1]
    before = load_file(str(Path(source.path) / WEIGHTS))
    after = load_file(str(Path(tuned.checkpoint_path) / WEIGHTS))
    assert (after["0.layers.0.weight"] == before["0.layers.0.weight"]).all()  # frozen
    assert not (after["1.layers.0.weight"] == before["1.layers.0.weight"]).all()  # trained on
    assert tuned.test_metrics["test_roc_auc"] > 0.97

    # layers that cannot be loaded cannot be frozen: a clear error before any worker starts
    wider = make_config(
        root,
        name="bcft",
        model={"depth": 2, "width": 32},  # the base model's layers are 64 wide
        train={"init_from": "bcft@1", "freeze_layers": 1},
    )
    with pytest.raises(ValueError, match=r"train.init_from=bcft@1: .*frozen tensors"):
        stage_train(wider, dv.ref, log=quiet)
