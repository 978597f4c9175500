"""What the training loop needs from its host, in three hosts: a Ray Train worker
(`TrainSession`), a one-process Tune trial (`TrialSession`), and one process without Ray
(`LocalSession`). Each gives the loop its rank, world size, device, data shards, a checkpoint to
resume from, and a place to report metrics and checkpoints."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

import numpy as np
import torch


def quiet_report_log() -> None:
    """Ray Train 2.60 logs every `report` at INFO on a logger named after its file, which reaches
    the console past `LoggingConfig(log_level)`: a line per epoch per worker. Quiet it."""
    import logging

    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # another Ray version: nothing to quiet
        pass
    # Tune's function trainables (one-worker trials) log each checkpoint they persist
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)


class TrainSession:
    """What the loop needs from its host, as Ray Train gives it to each DDP worker."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def shard(self, split: str):
        import ray.train

        return ray.train.get_dataset_shard(split)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP when world > 1

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)


PBT_STEP = "pbt_step"


class LocalSplit:
    """A stored split read with plain pyarrow, iterated the way the loop iterates a Ray Train
    shard. A PBT trial holds its CPUs itself, so Ray Data tasks inside it could wait forever for
    a CPU on a full node."""

    def __init__(self, table):
        self.table = table

    def iter_torch_batches(
        self, batch_size: int, collate_fn, device="cpu", local_shuffle_seed=None, **_
    ):
        table = self.table
        if local_shuffle_seed is not None:
            rng = np.random.default_rng(local_shuffle_seed)
            table = table.take(rng.permutation(len(table)))
        for start in range(0, len(table), batch_size):
            part = table.slice(start, batch_size)
            cols = {c: part.column(c).to_numpy() for c in part.column_names}
            x, y = collate_fn(cols)
            yield x.to(device), y.to(device)


class TrialSession:
    """The same loop in one process inside a Tune trial (PBT moves checkpoints between trials,
    which needs Tune's own checkpoints): rank 0 of 1, the splits read in the trial."""

    rank, world = 0, 1

    def __init__(self, splits: dict[str, LocalSplit], device: torch.device, epochs: int):
        self.splits, self.device, self.epochs = splits, device, epochs

    def shard(self, split: str) -> LocalSplit:
        return self.splits[split]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(directory) if directory else None
        if metrics["epoch"] + 1 < self.epochs:
            # PBT's clock: absent on the last epoch, so a finished trial is never sent back to
            # copy another's checkpoint (it would restart at its end and train no epoch)
            metrics = {**metrics, PBT_STEP: metrics["epoch"] + 1}
        tune.report(metrics, checkpoint=checkpoint)


class LocalCheckpoint:
    """A checkpoint folder on this machine, as the loop reads Ray's checkpoints."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class LocalSession:
    """The loop in one process without Ray (a GPU machine with torch only, the no-Ray tests):
    rank 0 of 1, the splits as pyarrow tables, checkpoints copied to `folder/checkpoint_NNNNNN`,
    and a run resumed from the latest of them."""

    rank, world = 0, 1

    def __init__(self, splits: dict[str, Any], folder: str, device: str = "cpu"):
        self.splits = {name: LocalSplit(table) for name, table in splits.items()}
        self.folder, self.device = folder, torch.device(device)
        self.reported: list[dict[str, Any]] = []

    def shard(self, split: str) -> LocalSplit:
        return self.splits[split]

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def checkpoints(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        names = os.listdir(self.folder)
        found = sorted(n for n in names if n.startswith("checkpoint_") and n[11:].isdigit())
        return [os.path.join(self.folder, n) for n in found]

    def checkpoint(self) -> LocalCheckpoint | None:
        found = self.checkpoints()
        return LocalCheckpoint(found[-1]) if found else None

    def report(self, metrics: dict[str, Any], directory: str | None = None) -> None:
        self.reported.append(metrics)
        if directory:  # copied whole under a temporary name, then renamed (one step locally)
            final = os.path.join(self.folder, f"checkpoint_{len(self.checkpoints()):06d}")
            shutil.copytree(directory, f"{final}.tmp")
            os.rename(f"{final}.tmp", final)
