"""Fault tolerance on a real local Ray: a training worker killed by PID mid-run is replaced."""

import threading
import time

import psutil
import pytest

from dcml.data.synth import synth_table
from dcml.layout import META
from dcml.pipeline import stage_train
from dcml.storage import Storage

from .conftest import make_config, run, write_shards

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


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


def checkpoints(run_dir) -> list:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def test_a_killed_worker_is_replaced_and_the_run_finishes(tmp_path):
    write_shards(tmp_path / "raw", synth_table(8_000, 0, 0), 4)
    dv, _ = run(tmp_path, name="faults")
    epochs = 8
    cfg = make_config(
        tmp_path / "store",
        data={"name": "faults"},
        model={"depth": 2, "width": 64},
        train={
            "workers": 2,
            "epochs": epochs,
            "batch_size": 8,
            "max_failures": 2,
            "keep_checkpoints": epochs,
        },
    )
    outcome: dict = {}

    def train():
        outcome["result"] = stage_train(cfg, dv.ref, run_id="killed", log=lambda _: None)[1]

    thread = threading.Thread(target=train)
    thread.start()
    runs = tmp_path / "store" / "runs" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline and len(checkpoints(runs)) < 2:
        time.sleep(0.1)
    victims = train_workers()
    assert victims, "no Ray Train worker process found"
    killed_at = len(checkpoints(runs))
    victims[0].kill()  # SIGKILL: a worker lost mid-run
    thread.join(timeout=600)
    assert not thread.is_alive() and "result" in outcome

    storage = Storage.from_config(cfg)
    metas = [storage.read_json(f"{p}/{META}") for p in checkpoints(runs)]
    assert killed_at < epochs  # the kill came mid-run
    # Every epoch ran, and the run resumed from its last checkpoint instead of starting over
    # (which would have checkpointed epoch 0 twice).
    done = [m["metrics"]["epoch"] for m in metas]
    assert set(done) == set(range(epochs)) and done.count(0) == 1
    assert outcome["result"].metrics["val_roc_auc"] > 0.8
