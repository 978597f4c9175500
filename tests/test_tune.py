"""Sweeps on a real local Ray Tune: search spaces, failed trials, results, optuna, resume."""

import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dcml.data.preprocess import preprocess
from dcml.data.synth import synth_table
from dcml.pipeline import resumed_config, stage_register, stage_tune
from dcml.storage import Storage

from .conftest import PNG, make_config, preprocessed, quiet, start_dcml, write_shards

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]


@pytest.fixture(scope="module")
def bc(tmp_path_factory):
    """The bundled breast-cancer data, preprocessed once for the module."""
    return preprocessed(tmp_path_factory.mktemp("tune") / "store")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic data (6,000 rows in 4 shards) preprocessed once for the module: (storage
    folder, raw folder, dataset version)."""
    folder = tmp_path_factory.mktemp("synth")
    write_shards(folder / "raw", synth_table(6_000, 0, 0), 4)
    data = {"name": "sweep", "source": str(folder / "raw")}
    cfg = make_config(folder / "store", data=data)
    return folder / "store", folder / "raw", preprocess(cfg, Storage.from_config(cfg), log=quiet)


def test_a_failed_trial_is_reported_and_the_sweep_goes_on_with_ddp_trials(bc):
    root, dv = bc
    cfg = make_config(
        root,
        tune={
            # batch_size 0 is a bad hyperparameter: that trial fails, naming the field
            "space": {
                "train.batch_size": {"grid": [32, 0]},
                "train.lr": {"loguniform": [3e-3, 1e-2]},
            },
            "epochs": 3,
            "grace_period": 1,
            "num_samples": 1,
            "workers_per_trial": 2,
            "max_concurrent_trials": 2,
        },
        train={"max_failures": 0},
    )
    lines: list[str] = []
    _, outcome = stage_tune(cfg, dv.ref, "sw1", lines.append)

    assert len(outcome.trials) == 2
    failed = [t for t in outcome.trials if t["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["train.batch_size"] == 0
    assert "batch_size" in failed[0]["error"]
    good = outcome.trials[0]  # best first
    assert good["train.batch_size"] == 32 and good["epochs"] >= 1
    assert good["val_roc_auc"] > 0.95 and outcome.params["train.batch_size"] == 32
    text = "\n".join(lines)
    assert "tuning results (best first)" in text and "failed: " in text

    sweep = root / "runs" / "sw1"
    table = pq.read_table(sweep / "trials.parquet").to_pylist()
    assert len(table) == 2 and {r["status"] for r in table} >= {"failed"}
    assert (sweep / "trials.csv").read_text().count("\n") == 3  # header + 2 trials
    for name in ("metric_by_param.png", "trial_curves.png"):
        assert (sweep / "plots" / name).read_bytes().startswith(PNG)
    # the best trial's Train run used DDP with 2 workers and lives under the sweep
    assert Path(outcome.checkpoint_path).is_relative_to(sweep / "trials")

    mv = stage_register(
        cfg, dv, outcome.checkpoint_path, {"sweep_id": "sw1", "params": outcome.params}, []
    )
    assert mv.meta["lineage"]["sweep_id"] == "sw1"
    assert mv.meta["lineage"]["params"]["train.batch_size"] == 32


def test_optuna_searches_the_space(bc):
    root, dv = bc
    cfg = make_config(
        root,
        tune={
            "space": {"train.lr": {"loguniform": [1e-3, 3e-2]}, "model.width": {"choice": [8, 16]}},
            "searcher": "optuna",
            "scheduler": "none",
            "epochs": 2,
            "num_samples": 2,
            "max_concurrent_trials": 2,
        },
    )
    _, outcome = stage_tune(cfg, dv.ref, "opt1", quiet)
    assert len(outcome.trials) == 2 and all(t["status"] == "finished" for t in outcome.trials)
    assert all(t["epochs"] == 2 for t in outcome.trials)
    assert all(1e-3 <= t["train.lr"] <= 3e-2 for t in outcome.trials)


def test_asha_stops_a_bad_trial_early(bc):
    """Two trials with a useful learning rate reach each rung first; two that barely move the
    weights fall below the cut there and ASHA stops them before the sweep's epoch budget (of
    the good two, ASHA may stop the worse at the second rung too)."""
    root, dv = bc
    cfg = make_config(
        root,
        tune={
            "space": {"train.lr": {"grid": [1e-2, 3e-2, 1e-9, 2e-9]}},
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "epochs": 4,
            "num_samples": 1,
            "max_concurrent_trials": 2,
        },
        model={"depth": 1, "width": 8},
    )
    _, outcome = stage_tune(cfg, dv.ref, "asha1", quiet)
    finished = [t for t in outcome.trials if t["status"] == "finished"]
    stopped = [t for t in outcome.trials if t["status"] == "stopped early"]
    assert finished and all(t["epochs"] == 4 and t["train.lr"] >= 1e-2 for t in finished)
    # the two that barely learn are cut at the first rung, below the good trials' values there
    assert {t["train.lr"] for t in stopped} >= {1e-9, 2e-9}
    assert all(t["epochs"] < 4 for t in stopped)
    assert outcome.params["train.lr"] >= 1e-2


def test_a_sweep_over_both_families_registers_the_better_on_validation(synth):
    """An MLP and gradient-boosted trees in one ASHA sweep on the synthetic data: the trees
    report their rounds in tune.epochs slices (ASHA's rungs), and whichever trial of either
    family is best on validation is registered, with its family and its trial's config."""
    store, raw, dv = synth
    cfg = make_config(
        store,
        data={"name": "sweep", "source": str(raw)},
        model={"depth": 1, "width": 16, "gbdt": {"rounds": 60, "early_stopping_rounds": 0}},
        train={"workers": 1, "batch_size": 128},
        tune={
            "space": {
                "model.family": {"grid": ["mlp", "gbdt"]},
                "model.gbdt.max_depth": {"choice": [3]},
            },
            "epochs": 3,
            "num_samples": 1,
            "max_concurrent_trials": 2,
        },
    )
    _, outcome = stage_tune(cfg, dv.ref, "fam1", quiet)
    by_family = {t["model.family"]: t for t in outcome.trials}
    assert set(by_family) == {"mlp", "gbdt"}
    assert by_family["mlp"]["epochs"] <= 3
    assert by_family["gbdt"]["epochs"] in (20, 40, 60)  # rounds, reported every 60 / 3
    best, other = outcome.trials  # best first
    assert best["val_roc_auc"] >= other["val_roc_auc"]
    assert outcome.params["model.family"] == best["model.family"]
    # the winner's lineage holds only the values its family reads
    assert ("model.gbdt.max_depth" in outcome.params) == (best["model.family"] == "gbdt")
    assert outcome.metrics["val_roc_auc"] == pytest.approx(best["val_roc_auc"])

    lineage = {"sweep_id": "fam1", "params": outcome.params}
    mv = stage_register(cfg, dv, outcome.checkpoint_path, lineage, [], quiet)
    assert mv.meta["model_spec"]["kind"] == best["model.family"]
    assert mv.meta["config"]["model"]["family"] == best["model.family"]


def test_population_based_training_moves_weights_between_trials(bc):
    root, dv = bc
    cfg = make_config(
        root,
        tune={
            "space": {"train.lr": {"loguniform": [1e-5, 3e-2]}},
            "scheduler": "pbt",
            "perturbation_interval": 2,
            "epochs": 4,
            "num_samples": 4,
        },
        train={"batch_size": 32},
    )
    _, outcome = stage_tune(cfg, dv.ref, "pbt1", quiet)
    assert len({t["trial"] for t in outcome.trials}) == 4
    assert all(t["status"] == "finished" and t["epochs"] == 4 for t in outcome.trials)
    assert outcome.trials[0]["val_roc_auc"] > 0.97
    # a worse trial took a better one's checkpoint and went on with a perturbed lr (the lr
    # schedule is constant, so a second lr in a trial's history is PBT's doing)
    histories = [pd.read_csv(p) for p in (root / "runs" / "pbt1").glob("*/progress.csv")]
    assert any(h["lr"].nunique() > 1 for h in histories)
    mv = stage_register(cfg, dv, outcome.checkpoint_path, {"sweep_id": "pbt1"}, [], quiet)
    assert mv.meta["metrics"]["test_roc_auc"] > 0.95


def trial_checkpoints(sweep: Path) -> dict[Path, list[str]]:
    """Each trial's folder (Tune's for one-worker trials, its Train run's for DDP trials): its
    checkpoint folder names with a stored meta.json."""
    found = {}
    for trial in sorted([*sweep.glob("_inline_trial_*"), *(sweep / "trials").glob("*")]):
        found[trial] = sorted(
            p.name for p in trial.glob("checkpoint_*") if (p / "meta.json").exists()
        )
    return found


def epochs_of(trial: Path) -> list[int]:
    return sorted(json.loads(m.read_text())["epoch"] for m in trial.glob("checkpoint_*/meta.json"))


def test_a_sweep_whose_driver_is_killed_resumes(tmp_path, synth):
    """`dcml tune` (a real CLI process joined to this Ray) is SIGKILLed while a trial after the
    first runs; `--resume` keeps the finished trials and finishes the rest."""
    store, folder, _ = synth
    epochs = 6
    raw = {
        "storage": {"root": str(store)},
        "data": {"name": "sweep", "source": str(folder)},
        "train": {"workers": 1, "batch_size": 8, "keep_checkpoints": epochs},
        "tune": {
            "space": {"model.depth": {"grid": [1, 2, 3]}},
            "scheduler": "none",
            "epochs": epochs,
            "num_samples": 1,
            "max_concurrent_trials": 1,
        },
    }
    cfg = make_config(store, **{k: v for k, v in raw.items() if k != "storage"})
    proc = start_dcml(tmp_path, raw, "tune", "--sweep-id", "s1", "--no-register")
    sweep = store / "runs" / "s1"

    def interrupted_mid_run() -> bool:
        """One trial is done and another has checkpoints that Tune's saved state knows of."""
        found = trial_checkpoints(sweep) if sweep.exists() else {}
        states = list(sweep.glob("experiment_state-*.json")) if sweep.exists() else []
        saved = max((p.stat().st_mtime for p in states), default=0)
        return epochs in map(len, found.values()) and any(
            1 < len(c) < epochs and (t / c[0] / "meta.json").stat().st_mtime < saved
            for t, c in found.items()
        )

    try:
        deadline = time.time() + 400
        while time.time() < deadline and not interrupted_mid_run():
            assert proc.poll() is None, (tmp_path / "dcml.log").read_text()
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = trial_checkpoints(sweep)
    finished = [t for t, c in before.items() if len(c) == epochs]
    # a line per trial that ended (no terminal: no table redrawn), and none of Ray's own output
    shown = (tmp_path / "dcml.log").read_text().splitlines()
    ended = [line for line in shown if line.startswith("trial ")]
    assert ended and all(f"finished after {epochs} epoch(s): " in line for line in ended), shown
    ray_own = ("pid=", "core_worker", "(raylet)", "WARNING", "Warning", "Traceback", "Dataset")
    assert [line for line in shown if any(r in line for r in ray_own)] == [], shown
    # one trial or two are done (trial processes are reused: a short trial can end between two
    # saves of Tune's state), and the next was interrupted mid-run
    assert 1 <= len(finished) <= 2 and len(before) == len(finished) + 1, before

    _, outcome = stage_tune(resumed_config(cfg, "s1"), None, "s1", quiet, resume=True)
    after = trial_checkpoints(sweep)
    assert len(outcome.trials) == 3 and all(t["status"] == "finished" for t in outcome.trials)
    assert all(after[t] == before[t] for t in finished)  # kept, not run again
    assert len(after) == 3
    interrupted = next(t for t in before if t not in finished)
    # it went on from its last checkpoint: epoch 0 was not run twice, no checkpoint overwritten
    assert epochs_of(interrupted).count(0) == 1
    assert set(epochs_of(interrupted)) == set(range(epochs))
    assert set(before[interrupted]) < set(after[interrupted])
