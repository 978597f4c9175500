"""A sweep's progress as its trials report. Tune runs its callbacks in the driver, so this one sees
every trial's epochs as they come: on a terminal, the table of trials redrawn in place (removed
when the sweep ends, which prints the final table); elsewhere (CI, `ray job logs`), a line per
trial that ends. Only under the `dcml` command (`console.enable`), like all progress."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from dcml import console
from dcml.config_model import reads


class TrialProgress(Callback):
    """`table(rows, metric, params)` draws the trials (tune.format_trials); `epochs` is a
    trial's budget, which tells a finished trial from one stopped early."""

    def __init__(
        self,
        metric: str,
        params: list[str],
        epochs: int,
        table: Callable[..., str],
        family: str = "mlp",
    ):
        self.metric, self.params, self.epochs, self.table = metric, params, epochs, table
        self.family = family  # the sweep's; a trial's own when it searches model.family
        self.rows: dict[str, dict[str, Any]] = {}
        self.board = console.LiveText()

    def __getstate__(self) -> dict[str, Any]:
        """Tune stores its callbacks with the sweep (for --resume): not what is on screen."""
        return {**self.__dict__, "rows": {}, "board": console.LiveText()}

    def _row(self, trial) -> dict[str, Any]:
        if trial.trial_id not in self.rows:
            self.rows[trial.trial_id] = {
                "trial": trial.trial_id,
                "family": trial.config.get("model.family", self.family),
                **{p: trial.config.get(p) for p in self.params},
                "epochs": 0,
                self.metric: float("nan"),
                "status": "pending",
                "error": "",
            }
        return self.rows[trial.trial_id]

    def _draw(self) -> None:
        self.board.show(self.table(list(self.rows.values()), self.metric, self.params))

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._row(trial)["status"] = "running"
        self._draw()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        row = self._row(trial)
        row["status"] = "running"
        if "epoch" in result:
            row["epochs"] = int(result["epoch"]) + 1
        row["budget"] = result.get("rounds_budget", self.epochs)  # gbdt: its rounds
        row["finished"] = bool(result.get("finished"))  # early stopping ended it
        if self.metric in result:
            row[self.metric] = float(result[self.metric])
        self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        row = self._row(trial)
        budget = row.get("budget", self.epochs)
        done = row.get("finished") or row["epochs"] >= budget
        row["status"] = "finished" if done else "stopped early"
        self._ended(row)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        row = self._row(trial)
        row["status"] = "failed"
        try:  # what Tune wrote of the error just now, on this machine (storage has it later)
            with open(trial.error_file) as f:
                row["error"] = console.last_line(f.read())
        except (OSError, TypeError):  # none: the final table names it
            pass
        self._ended(row)

    def _ended(self, row: dict[str, Any]) -> None:
        if console.drawn():
            self._draw()
        elif console.enabled():
            shown = [p for p in self.params if reads(p, row["family"])]
            params = ", ".join(f"{p}={_short(row[p])}" for p in shown)
            unit = "round(s)" if row["family"] == "gbdt" else "epoch(s)"
            line = f"trial {row['trial']} {row['status']} after {row['epochs']} {unit}"
            if row["error"]:
                line += f": {row['error']}"
            elif row[self.metric] == row[self.metric]:
                line += f": {self.metric}={row[self.metric]:.4f}"
            print(f"{line} ({params})" if params else line, flush=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.board.close()


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
