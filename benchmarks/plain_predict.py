"""The plain batch-inference script `batch_bench.py` times `dcml predict` against: one process,
pyarrow and the same `Predictor`, shard by shard, the same output columns as Parquet.

    python benchmarks/plain_predict.py MODEL_DIR INPUT_DIR OUTPUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))
from dcml.predictor import Predictor  # noqa: E402


def main(model_dir: str, input_dir: str, output_dir: str) -> None:
    predictor = Predictor.from_dir(model_dir)
    id_col = predictor.meta["config"]["data"]["id_column"]
    os.makedirs(output_dir)
    for n, path in enumerate(sorted(Path(input_dir).rglob("*.parquet"))):
        parts = []
        for batch in pq.ParquetFile(path).iter_batches(65_536, columns=[id_col, *predictor.inputs]):
            out = predictor.predict_columns({c: batch.column(c) for c in predictor.inputs})
            columns = {"id": batch.column(id_col)}
            if predictor.task == "regression":
                columns["value"] = pa.array(out.astype(np.float64))
            else:
                columns["label"] = pa.array(predictor.labels(out))
                best = out if predictor.task == "binary" else out.max(axis=1)
                columns["probability"] = pa.array(best.astype(np.float64))
            columns["model_version"] = pa.array([predictor.version] * len(out))
            parts.append(pa.table(columns))
        pq.write_table(pa.concat_tables(parts), os.path.join(output_dir, f"part-{n:05d}.parquet"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
