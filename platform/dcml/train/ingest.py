"""Data into the training loop: stored splits as Ray Datasets (or pyarrow tables), batches as
tensors, and a worker's shard cached on its device."""

from __future__ import annotations

import numpy as np
import torch

from dcml.data.catalog import DatasetVersion
from dcml.storage import Storage
from dcml.train.step import label_tensor


def collate_fn(features: list[str], task: str):
    """Batches of numpy columns (from Ray Data, or a `LocalSplit`) -> (features, label) tensors."""
    try:  # tells Ray Data to hand over numpy batches; without Ray the loop calls it itself
        from ray.data.collate_fn import NumpyBatchCollateFn as Base
    except ImportError:
        Base = object

    class FeaturesAndLabel(Base):
        def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
            x = np.stack([batch[c] for c in features], axis=1).astype(np.float32, copy=False)
            return torch.from_numpy(x), label_tensor(batch["label"].copy(), task, "cpu")

    return FeaturesAndLabel()


def cache_shard(
    shard,
    collate,
    device: torch.device,
    where: str,
    name: str = "train",
    rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a worker's whole shard once through `iter_torch_batches` and keep it: on `device`
    (where="device"; on a GPU only if it fits in half its free memory) or in host memory.
    `rows=(lo, hi)`: `shard` is the whole split, of which this worker keeps rows lo to hi (its
    slice; only those are kept while reading)."""
    parts, seen = [], 0
    for bx, by in shard.iter_torch_batches(batch_size=8192, collate_fn=collate, device="cpu"):
        start, seen = seen, seen + len(bx)
        if rows is not None:  # this batch's rows inside lo..hi, copied out of the batch
            lo, hi = max(rows[0] - start, 0), rows[1] - start
            bx, by = bx[lo:hi].clone(), by[lo:hi].clone()
        parts.append((bx, by))
        if rows is not None and seen >= rows[1]:
            break
    if not parts or not sum(len(p[0]) for p in parts):
        raise RuntimeError(f"a worker's {name} shard is empty: use fewer train.workers")
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if device.type == "cpu":
        return x, y
    if where == "device":
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        if x.nbytes + y.nbytes < free / 2:
            return x.to(device), y.to(device)
        print(
            f"[dcml] the shard ({x.nbytes / 2**30:.1f} GiB) does not fit on {device}; "
            "caching it in host memory",
            flush=True,
        )
    return x.pin_memory(), y.pin_memory()


SMALL_SPLIT_BYTES = 64 << 20  # stored Parquet bytes below which the driver reads a split itself


def split_tables(storage: Storage, dataset: DatasetVersion, split: str) -> list:
    """A stored split's shards as pyarrow tables, in file order (the names hold the split)."""
    import pyarrow.parquet as pq

    return [pq.read_table(f, filesystem=storage.fs) for f in dataset.shard_paths(split)]


def is_small(dataset: DatasetVersion, split: str) -> bool:
    """Whether a split's stored Parquet is at most SMALL_SPLIT_BYTES."""
    return sum(s["bytes"] for s in dataset.shards(split)) <= SMALL_SPLIT_BYTES


def slice_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows of a split that rank `rank` of `world` keeps: contiguous, near-equal (sizes
    differ by at most one), together the whole split."""
    return rows * rank // world, rows * (rank + 1) // world


def split_dataset(storage: Storage, dataset: DatasetVersion, split: str):
    """A stored split as a materialised Ray Dataset, its blocks in file order (so that the same
    seed and worker count give every rank the same rows).

    Materialised in the driver: the workers then split blocks already in the object store instead
    of each starting read tasks (seconds per process on a small node). A small split is read with
    plain pyarrow, which takes milliseconds where Ray Data's read tasks take seconds to start.
    """
    import ray.data

    if is_small(dataset, split):
        return ray.data.from_arrow(split_tables(storage, dataset, split))
    ds = ray.data.read_parquet(dataset.shard_paths(split), filesystem=storage.arrow_fs())
    ds.context.execution_options.preserve_order = True
    return ds.materialize()
