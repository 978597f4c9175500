"""Gradient-boosted trees: XGBoost's own training, round by round, through the same sessions as
the MLP's loop (dcml.train.session): on every Ray Train worker of an `XGBoostTrainer` (which
joins the workers' XGBoost into one data-parallel run), in a one-process Tune trial, and in one
process without Ray.

After every round the model is scored on the whole validation split with the same metrics and
loss as the MLP (its margins are an MLP's logits), which drives early stopping. Every
`model.gbdt.checkpoint_every` rounds, and at the end, the session gets a report whose metrics
are those of the best round so far and a checkpoint whose model ends at that round: a report
and its checkpoint describe one model, the one that would be registered. The checkpoint also
keeps the whole booster and the per-round history, from which a resumed run goes on.

Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from dcml.config import PipelineConfig
from dcml.layout import BOOSTER, META
from dcml.train.booster import require_xgboost, xgb
from dcml.train.checkpoint import read_history, write_history
from dcml.train.ingest import cache_shard, collate_fn, slice_bounds
from dcml.train.model import n_outputs
from dcml.train.session import quiet_report_log
from dcml.train.step import EarlyStop, evaluate_outputs, make_loss

WHOLE = "whole.ubj"  # in a checkpoint: every round's trees, when the model ends before them
STATE = "gbdt_state.json"  # in a checkpoint: the last round, the early-stopping state

Callback = xgb.callback.TrainingCallback if xgb is not None else object


# XGBoost's objective and training metric per task (the metric gives each round's train_loss)
OBJECTIVES = {
    "binary": ("binary:logistic", "logloss"),
    "multiclass": ("multi:softprob", "mlogloss"),
    "regression": ("reg:squarederror", "rmse"),
}


def booster_params(
    cfg: PipelineConfig, task: str, n_classes: int, class_weights: list[float] | None
) -> dict[str, Any]:
    """XGBoost's parameters for a run: `model.gbdt.*`, the task's objective, the worker's CPUs
    as threads, the GPU when `train.use_gpu`, the seed, and balanced class weights as
    scale_pos_weight (binary; multiclass weighs rows instead, see `_matrix`)."""
    g = cfg.model.gbdt
    objective, metric = OBJECTIVES[task]
    if task == "regression" and cfg.train.loss == "huber":
        objective, metric = "reg:pseudohubererror", "mphe"  # slope 1, like torch's HuberLoss
    params: dict[str, Any] = {
        "objective": objective,
        "eval_metric": metric,
        "eta": g.eta,
        "max_depth": g.max_depth,
        "min_child_weight": g.min_child_weight,
        "subsample": g.subsample,
        "colsample_bytree": g.colsample_bytree,
        "lambda": g.reg_lambda,
        "alpha": g.reg_alpha,
        "gamma": g.gamma,
        "max_bin": g.max_bin,
        "tree_method": g.tree_method,
        "seed": cfg.seed,
        "nthread": max(1, int(cfg.train.cpus_per_worker)),
        "device": "cuda" if cfg.train.use_gpu else "cpu",
        "verbosity": 1,  # warnings only
    }
    if task == "multiclass":
        params["num_class"] = n_classes
    if task == "binary" and class_weights:
        params["scale_pos_weight"] = class_weights[1] / class_weights[0]
    return params


def gbdt_spec(params: dict[str, Any], n_features: int, n_out: int, rounds: int) -> dict[str, Any]:
    """What model.json says of a booster: its family, shape and parameters, and its rounds."""
    shown = {k: v for k, v in params.items() if k not in ("nthread", "device", "verbosity")}
    return {
        "kind": "gbdt",
        "n_features": n_features,
        "n_outputs": n_out,
        "rounds": rounds,
        "params": shown,
    }


def _matrix(x: np.ndarray, y: np.ndarray, task: str, weights: list[float] | None, threads: int):
    w = None
    if task == "multiclass" and weights:
        w = np.asarray(weights, dtype=np.float32)[y.astype(np.int64)]
    return xgb.DMatrix(x, label=y, weight=w, nthread=threads)


def _split(session, name: str, features: list[str], task: str, rows=None):
    """A worker's rows of a split as numpy (features, labels)."""
    collate = collate_fn(features, task)
    x, y = cache_shard(session.shard(name), collate, torch.device("cpu"), "memory", name, rows)
    return x.numpy(), y.numpy()


class _Rounds(Callback):
    """After each round: score the validation split, keep the history and the best round,
    report and checkpoint every `every` rounds and at the end; True stops training."""

    def __init__(self, run: GbdtRun):
        super().__init__()
        self.run = run

    def after_iteration(self, model, epoch: int, evals_log) -> bool:
        return self.run.after_round(model, epoch, evals_log)


class GbdtRun:
    def __init__(self, config: dict[str, Any], session):
        """`config["cfg"]`: a validated PipelineConfig (gbdt_train_func makes it one)."""
        cfg = config["cfg"]
        self.cfg, self.session = cfg, session
        self.features: list[str] = config["features"]
        self.task: str = config.get("task", "binary")
        classes = config.get("classes")
        self.n_out = n_outputs(self.task, classes)
        weights = None
        if cfg.train.class_weights == "balanced" and self.task != "regression":
            weights = config["class_weights"]  # from the whole training split
        self.weights = weights
        self.params = booster_params(cfg, self.task, len(classes or []), weights)
        self.loss_fn = make_loss(self.task, cfg.train.loss, weights)
        self.progress = config.get("progress", True)
        self.every = config.get("report_every") or cfg.model.gbdt.checkpoint_every
        self.rounds = cfg.model.gbdt.rounds
        tc = cfg.train
        patience = cfg.model.gbdt.early_stopping_rounds or None
        # what stops training and picks the round kept: val_loss, or train.metric
        self.by = "val_loss" if cfg.model.gbdt.stop_on == "loss" else tc.metric
        mode, target = ("min", None) if self.by == "val_loss" else (tc.mode, tc.target)
        self.stop = EarlyStop(mode, patience, tc.min_delta, target, unit="rounds")
        self.history: list[dict[str, float]] = []
        # the best round by the metric itself (min_delta only decides when to stop)
        self.best_round, self.best_metrics = -1, {}
        self.sign = 1.0 if mode == "max" else -1.0
        self.started, self.offset = time.perf_counter(), 0  # offset: rounds before this call

    def train(self, train_rows: int = 0) -> None:
        s, threads = self.session, self.params["nthread"]
        part = slice_bounds(train_rows, s.rank, s.world) if train_rows else None
        x, y = _split(s, "train", self.features, self.task, part)
        vx, vy = _split(s, "validation", self.features, self.task)
        if self.params["objective"] == "reg:pseudohubererror":
            # XGBoost's own first guess for pseudo-Huber is far off for labels away from 0 (it
            # never recovers): start from the labels' median (averaged over the workers)
            median = np.array([np.median(y)], dtype=np.float64)
            if xgb.collective.is_distributed():
                median = xgb.collective.allreduce(median, xgb.collective.Op.SUM) / s.world
            self.params["base_score"] = float(median[0])
        dtrain = _matrix(x, y, self.task, self.weights, threads)
        self.dval, self.vy = xgb.DMatrix(vx, nthread=threads), vy
        del x, y, vx  # the DMatrix holds its own copy
        booster, start = None, 0
        checkpoint = s.checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                booster, start = self._resume(d)
        if start >= self.rounds or self.stop.reason:
            if s.rank == 0 and self.progress:
                why = self.stop.reason or f"all {self.rounds} rounds are done"
                print(f"[dcml] nothing to train: {why} (model.gbdt.*)", flush=True)
            return
        self.started, self.offset = time.perf_counter(), start
        xgb.train(
            self.params,
            dtrain,
            num_boost_round=self.rounds - start,
            evals=[(dtrain, "train")],  # each round's training loss (summed over the workers)
            xgb_model=booster,
            callbacks=[_Rounds(self)],
            verbose_eval=False,
        )

    def _resume(self, folder: str):
        state = _read_json(os.path.join(folder, STATE))
        booster = xgb.Booster()
        whole = os.path.join(folder, WHOLE)
        booster.load_model(whole if os.path.exists(whole) else os.path.join(folder, BOOSTER))
        self.history = read_history(folder)
        self.best_round, self.best_metrics = state["best_round"], state["best_metrics"]
        self.stop.best, self.stop.bad_epochs = state["stop"]["best"], state["stop"]["bad_epochs"]
        # stopped under this config too? (a resume may allow more rounds or more patience)
        patience = self.stop.patience
        if patience is not None and self.stop.bad_epochs >= patience:
            self.stop.reason = f"no improvement for {patience} rounds"
        done = booster.num_boosted_rounds()
        if self.session.rank == 0 and self.progress:
            print(f"[dcml] resuming from the checkpoint of round {done}", flush=True)
        return booster, done

    def after_round(self, booster, i: int, evals_log) -> bool:
        r = self.offset + i  # XGBoost counts the rounds of this call from 0
        margins = booster.predict(self.dval, output_margin=True)  # cached: only the new trees
        out = torch.from_numpy(np.asarray(margins, dtype=np.float32).reshape(len(self.vy), -1))
        val = evaluate_outputs(out, self.vy, self.task, self.loss_fn)
        train_loss = float(next(iter(evals_log["train"].values()))[-1])
        if self.params["eval_metric"] == "rmse" and self.cfg.train.loss != "huber":
            train_loss **= 2  # the loss trees minimise is the mean squared error
        now = time.perf_counter()
        metrics = {"epoch": r, "round": r + 1, "train_loss": train_loss, **val}
        metrics |= {"epoch_s": now - self.started, "time": time.time()}
        self.started = now
        self.history.append(metrics)
        metric = self.by
        value = metrics[metric]
        if not np.isfinite(value):
            raise ValueError(
                f"train.metric={metric} is {value} on the validation split after round {r + 1} "
                "(a validation split with one class has no ROC AUC): choose another metric, "
                "e.g. val_loss, or another split"
            )
        done = self.stop.update(value)
        if self._better(val):  # a new best round
            self.best_round, self.best_metrics = r, val
        last = done or r == self.rounds - 1
        if self.progress and self.session.rank == 0 and ((r + 1) % self.every == 0 or last):
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val_"))
            line = f"[dcml] round {r + 1}/{self.rounds} train_loss={train_loss:.4f} {shown}"
            print(line, flush=True)
        if (r + 1) % self.every == 0 or last:
            self._report(booster, r, done)
        if done and self.session.rank == 0 and self.progress:
            print(
                f"[dcml] stopping after round {r + 1}: {metric} {self.stop.reason}; the model "
                f"ends at round {self.best_round + 1}",
                flush=True,
            )
        return done

    def _better(self, val: dict[str, float]) -> bool:
        """Whether a round beats the best so far: by its metric, then (a tie) by val_loss."""
        if not self.best_metrics:
            return True
        gain = self.sign * (val[self.by] - self.best_metrics[self.by])
        return gain > 0 or (gain == 0 and val["val_loss"] < self.best_metrics["val_loss"])

    def _report(self, booster, r: int, stopped: bool = False) -> None:
        """Report the best round so far, with a checkpoint (from rank 0) of the model that
        ends there. `stopped`: early stopping ended the run (a sweep's trial that stopped
        itself, not one its scheduler stopped)."""
        metrics = {
            **self.best_metrics,
            "epoch": r,
            "round": r + 1,
            "best_round": self.best_round + 1,
            "rounds_budget": self.rounds,
            "train_loss": self.history[self.best_round]["train_loss"],
            "time": time.time(),
        }
        if stopped:
            metrics["finished"] = 1
        if self.session.rank != 0:
            self.session.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            model = booster[: self.best_round + 1] if self.best_round < r else booster
            model.save_model(os.path.join(d, BOOSTER))
            if self.best_round < r:
                booster.save_model(os.path.join(d, WHOLE))
            spec = gbdt_spec(self.params, len(self.features), self.n_out, self.best_round + 1)
            meta = {"metrics": metrics, "model_spec": spec, "features": self.features, "epoch": r}
            _write_json(os.path.join(d, META), meta)
            state = {
                "round": r,
                "best_round": self.best_round,
                "best_metrics": self.best_metrics,
                "stop": {**self.stop.state(), "reason": self.stop.reason},
            }
            _write_json(os.path.join(d, STATE), state)
            write_history(d, self.history)
            self.session.report(metrics, d)


def gbdt_train_func(config: dict[str, Any], session=None) -> None:
    """Runs on every worker of an `XGBoostTrainer` (or in a Tune trial, or without Ray): the
    worker's rows of the training split, the whole validation split, boosted round by round."""
    cfg = config["cfg"]
    if not isinstance(cfg, PipelineConfig):
        cfg = PipelineConfig.model_validate(cfg)
    require_xgboost(gpu=cfg.train.use_gpu)
    config = {**config, "cfg": cfg}
    if config.get("progress", True) != "verbose":
        quiet_report_log()
    if session is None:  # on a Ray Train worker
        from dcml.train.session import TrainSession

        session = TrainSession()
    GbdtRun(config, session).train(config.get("train_rows", 0))


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


def _read_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
