"""The predictor on its own: `Predictor.predict_records` (what a Serve replica runs per batch)
against a plain PyTorch function over the same model, in the same run. No Ray.

    python benchmarks/predictor_bench.py [--repeat 2000] [--device cpu]

Both take JSON-like records (dicts of raw values by column name) of the breast-cancer data and
return one answer dict per record, with the same MLP (depth 2, width 64, random weights):

* dcml: `Predictor.predict_records`: imputation, clipping and scaling from the stored preprocessor
  state (vectorised over all columns), the model, sigmoid, label by threshold;
* plain: a NumPy matrix from the records, `(x - mean) / std`, the model, sigmoid, label by 0.5.

Prints ms per call at 1, 64 and 1,000 records, records/s, and the ratio (dcml / plain). The plain
function does no imputation or clipping, so the ratio is the price of the preprocessor's extra work
and of its generality.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "platform"))

from dcml.data.sources import breast_cancer_table  # noqa: E402
from dcml.data.transforms import Preprocessor  # noqa: E402
from dcml.predictor import Predictor  # noqa: E402
from dcml.train.model import build_model  # noqa: E402


def timed(fns: list, records: list[dict], repeat: int) -> list[float]:
    """Median seconds of each `fn(records)` over `repeat` rounds (after a warm-up); the functions
    take turns in every round, so both see the same machine."""
    for fn in fns:
        for _ in range(min(50, repeat)):
            fn(records)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn(records)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2000, help="calls per cell")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    table = breast_cancer_table()
    features = [c for c in table.column_names if c not in ("id", "label")]
    x = np.stack([table.column(c).to_numpy() for c in features], 1)
    mean, std = x.mean(0), x.std(0)
    low, high = np.quantile(x, 0.001, axis=0), np.quantile(x, 0.999, axis=0)
    pre = Preprocessor(
        numeric=features,
        categorical=[],
        fill=dict(zip(features, mean.tolist())),
        clip={c: [lo, hi] for c, lo, hi in zip(features, low.tolist(), high.tolist())},
        center=dict(zip(features, mean.tolist())),
        scale=dict(zip(features, std.tolist())),
        categories={},
    )
    spec = {
        "kind": "mlp",
        "n_features": len(features),
        "n_outputs": 1,
        "depth": 2,
        "width": 64,
        "activation": "relu",
        "dropout": 0.1,
    }
    torch.manual_seed(0)
    model = build_model(spec)
    from safetensors.torch import save

    meta = {"name": "bc", "version": 1, "preprocessor": pre.to_json(), "model_spec": spec}
    predictor = Predictor(save(model.state_dict()), meta, args.device)
    plain_model = predictor.model  # the same weights, in eval mode
    device = torch.device(args.device)
    mean_t, std_t = np.asarray(mean), np.asarray(std)

    @torch.no_grad()
    def plain(records: list[dict]) -> list[dict]:
        m = np.array([[r[c] for c in features] for r in records], dtype=np.float64)
        t = torch.as_tensor((m - mean_t) / std_t, dtype=torch.float32, device=device)
        p = torch.sigmoid(plain_model(t).squeeze(-1)).cpu().numpy()
        return [{"label": int(v >= 0.5), "probability": float(v)} for v in p]

    rows = [{c: r[c] for c in features} for r in table.to_pylist()]
    print(f"device {args.device}; {args.repeat} calls per cell (median)")
    print(
        "| records | dcml ms | plain ms | dcml records/s | plain records/s | ratio | same labels |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (1, 64, 1000):
        records = (rows * (n // len(rows) + 1))[:n]
        same = np.mean(
            [
                a["label"] == b["label"]
                for a, b in zip(predictor.predict_records(records), plain(records))
            ]
        )
        repeat = max(50, args.repeat // (1 + n // 64))
        ours, base = timed([predictor.predict_records, plain], records, repeat)
        print(
            f"| {n:,} | {ours * 1e3:.3f} | {base * 1e3:.3f} | {n / ours:,.0f} | {n / base:,.0f} "
            f"| {ours / base:.2f}x | {same:.1%} |"
        )


if __name__ == "__main__":
    main()
