"""The training step and the predictor on CUDA (or CPU), without Ray, in one short run.

    python benchmarks/gpu_check.py [--device cuda] [--rows 200000] [--epochs 3]

Needs torch, numpy, pyarrow, safetensors and pydantic, not Ray (a GPU machine may lack it). It
trains the same MLP in float32 and in bf16 autocast (and fp16 with a grad scaler on CUDA) with
dcml's training step, prints samples/s of each and of a bare PyTorch step, checks that the
mixed-precision models predict what the float32 one does (within a tolerance), runs dcml's one
training loop (`fit_local`: what Ray Train workers run) in bf16 with a resume, and runs the
Predictor (raw columns -> preprocessor -> model) and batch inference's scorer on the same
device (pinned host batches copied to the GPU), against the CPU's answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from dcml.data.transforms import Preprocessor  # noqa: E402
from dcml.predictor import Predictor  # noqa: E402
from dcml.train.checkpoint import save_checkpoint  # noqa: E402
from dcml.train.metrics import binary_metrics  # noqa: E402
from dcml.train.model import build_model  # noqa: E402
from dcml.train.step import (  # noqa: E402
    StepOptions,
    make_loss,
    make_optimizer,
    predict,
    shuffled_batches,
    train_epoch,
)


def data(rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=features)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(x @ w) / np.sqrt(features) * 3))).astype(np.float32)
    return x, y


def spec(features: int) -> dict:
    return {
        "n_features": features,
        "n_outputs": 1,
        "depth": 3,
        "widths": [256, 256, 256],
        "activation": "relu",
        "dropout": 0.0,
        "norm": "layer",
        "residual": True,
    }


def run(precision: str, x, y, device, epochs: int, batch: int) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(0)
    model = build_model(spec(x.shape[1])).to(device)
    opt = make_optimizer(model, "adamw", 1e-3, 1e-4)
    tx, ty = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    steps = len(x) // batch
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    options = StepOptions(precision=precision)
    loss_fn = make_loss("binary")
    warmup = shuffled_batches(tx, ty, batch, 5, torch.Generator().manual_seed(0))
    train_epoch(model, opt, warmup, loss_fn, options, scaler)
    sync(device)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(epoch)
        batches = shuffled_batches(tx, ty, batch, steps, g)
        train_epoch(model, opt, batches, loss_fn, options, scaler)
    sync(device)
    return model, epochs * steps * batch / (time.perf_counter() - t0)


def plain_step_rate(x, y, device, epochs: int, batch: int) -> float:
    """The same model and batches in a bare PyTorch loop: the floor of what ours can do."""
    torch.manual_seed(0)
    model = build_model(spec(x.shape[1])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    tx, ty = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    steps = len(x) // batch
    for epoch in range(-1, epochs):  # epoch -1: a few warm-up steps, not timed
        if epoch == 0:
            sync(device)
            t0 = time.perf_counter()
        order = torch.randperm(len(x), device=device)
        for s in range(5 if epoch < 0 else steps):
            idx = order[s * batch : (s + 1) * batch]
            loss = loss_fn(model(tx[idx]).squeeze(-1), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(device)
    return epochs * steps * batch / (time.perf_counter() - t0)


def real_loop(x, y, xv, yv, device: torch.device, out: str) -> float:
    """dcml's one training loop (`fit_local`, what every Ray Train worker runs), bf16 autocast,
    its splits cached on the device; then a rerun resumes from its checkpoint. Its last ROC AUC."""
    import pyarrow as pa

    from dcml.config import parse_config
    from dcml.train.loop import fit_local

    names = [f"f{j}" for j in range(x.shape[1])]

    def table(a, b):
        return pa.table(
            {"id": range(len(b)), "label": b, **{n: a[:, j] for j, n in enumerate(names)}}
        )

    raw = {"model": {"depth": 2, "width": 128, "dropout": 0.0}, "seed": 0}
    raw["train"] = {"epochs": 2, "batch_size": 1024, "precision": "bf16", "workers": 1}
    splits = {"train": table(x, y), "validation": table(xv, yv)}
    first = fit_local(parse_config(raw), splits, out, names, device=str(device))
    raw["train"]["epochs"] = 3
    resumed = fit_local(parse_config(raw), splits, out, names, device=str(device))
    assert [h["epoch"] for h in first + resumed] == [0, 1, 2], "the loop did not resume"
    return resumed[-1]["val_roc_auc"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", default="/tmp/dcml-gpu-check")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    x, y = data(args.rows + 20_000, args.features)
    x, y, xv, yv = x[20_000:], y[20_000:], x[:20_000], y[:20_000]
    tv = torch.as_tensor(xv, device=device)

    plain = plain_step_rate(x, y, device, args.epochs, args.batch)
    print(f"plain PyTorch step       {plain:>12,.0f} samples/s")
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    reference = None
    failures = []
    for precision in precisions:
        model, rate = run(precision, x, y, device, args.epochs, args.batch)
        p = predict(model, tv, "binary")
        m = binary_metrics(yv, p)
        line = f"dcml loop {precision:<5}          {rate:>12,.0f} samples/s"
        line += f" ({rate / plain:.2f}x plain)"
        line += f"  val ROC AUC {m['roc_auc']:.4f}"
        if reference is None:
            reference = (model, p, m)
        else:
            gap = abs(m["roc_auc"] - reference[2]["roc_auc"])
            moved = float(np.abs(p - reference[1]).mean())
            line += f"  (AUC gap to fp32 {gap:.4f}; mean |p - p_fp32| {moved:.4f})"
            if gap > 0.01:
                failures.append(
                    f"{precision}: ROC AUC {m['roc_auc']:.4f} vs fp32 {reference[2]['roc_auc']:.4f}"
                )
        print(line)

    import shutil

    shutil.rmtree(f"{args.out}-loop", ignore_errors=True)
    auc = real_loop(x, y, xv, yv, device, f"{args.out}-loop")
    print(f"dcml training loop (fit_local, bf16, resumed): val ROC AUC {auc:.4f}")
    if auc < 0.8:
        failures.append(f"the training loop reached ROC AUC {auc:.4f}")

    # class-weighted losses keep their weights on the device of the outputs
    out, labels = torch.randn(8, 3, device=device), torch.arange(8, device=device) % 3
    make_loss("multiclass", class_weights=[1.0, 2.0, 3.0], device=device)(out, labels)
    make_loss("binary", class_weights=[1.0, 2.0], device=device)(out[:, :1], labels.float() % 2)

    # The predictor on the device: raw columns -> preprocessor state -> the fp32 model.
    names = [f"f{j}" for j in range(args.features)]
    pre = Preprocessor(
        numeric=names,
        categorical=[],
        fill=dict.fromkeys(names, 0.0),
        clip={},
        center=dict.fromkeys(names, 0.0),
        scale=dict.fromkeys(names, 1.0),
        categories={},
    )
    out = Path(args.out)
    opt = make_optimizer(reference[0], "adamw", 1e-3, 0)
    save_checkpoint(str(out), reference[0], opt, 0, {})
    import json

    (out / "model.json").write_text(
        json.dumps(
            {
                "name": "gpu-check",
                "version": 0,
                "preprocessor": pre.to_json(),
                "model_spec": spec(args.features),
            }
        )
    )
    predictor = Predictor.from_dir(str(out), device=str(device))
    columns = {n: xv[:, j] for j, n in enumerate(names)}
    sync(device)
    t0 = time.perf_counter()
    served = predictor.predict_columns(columns)
    sync(device)
    rate = len(xv) / (time.perf_counter() - t0)
    diff = float(np.abs(served - reference[1]).max())
    print(
        f"predictor (raw columns)  {rate:>12,.0f} rows/s; max |difference| to the loop {diff:.2e}"
    )
    if diff > 1e-4:
        failures.append(f"predictor differs from the model by {diff}")

    # Batch inference's scorer (what `dcml predict` runs per batch, with use_gpu on the device):
    # Arrow batches of raw rows -> id, label, probability; the same labels as on the CPU.
    import pyarrow as pa

    from dcml.scoring import BatchScorer

    table = pa.table({"id": np.arange(len(xv)), **columns})
    batches = table.to_batches(65_536)
    rates, tables = {}, {}
    for where in dict.fromkeys(["cpu", str(device)]):
        scorer = BatchScorer(Predictor.from_dir(str(out), device=where), "id")
        scorer.score(batches[0])  # warm-up
        sync(torch.device(where))
        t0 = time.perf_counter()
        tables[where] = pa.concat_tables([scorer.score(b)[0] for b in batches])
        rates[where] = len(xv) / (time.perf_counter() - t0)
    same = np.mean(
        tables["cpu"].column("label").to_numpy() == tables[str(device)].column("label").to_numpy()
    )
    gap = np.abs(
        tables["cpu"].column("probability").to_numpy()
        - tables[str(device)].column("probability").to_numpy()
    ).max()
    print(
        f"batch scorer on {device}     {rates[str(device)]:>12,.0f} rows/s "
        f"({rates[str(device)] / rates['cpu']:.2f}x the CPU's); max |p - p_cpu| {gap:.2e}, "
        f"{same:.2%} same labels"
    )
    if gap > 1e-4:
        failures.append(f"batch scores on {device} differ from the CPU's by {gap}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
