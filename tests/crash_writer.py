"""Writers for tests/test_crashes.py: each writes things in a loop until it is killed (SIGKILL).

Run as `python tests/crash_writer.py`, this is a fork server: it imports dcml once (torch alone
takes seconds to import on a busy 2-core machine, far more than a kill round may cost), then reads
one JSON command per line on stdin and answers one JSON line on stdout:

  {"op": "start", "kind": K, "markers": PATH, "kill_at": F, ...}
      forks a writer of kind K and its killer, which sends the writer SIGKILL F times as long
      after the writer is ready as the writer's second warm-up thing took (a process of its own,
      asleep until then, so that the kill comes on time however busy the test is); answers
      {"pid": N}
  {"op": "wait", "pid": N}
      reaps the writer once it is dead; answers {"pid", "signal", "code"}

At the end of stdin it kills the writers and killers still running (its own children, by PID),
reaps them and exits. A writer appends lines to its markers file, unbuffered (one `os.write`
each), so that the test can tell after a kill where the writer was:

  S <t>               forked
  R <t> <seconds>     set up and warmed up (see below; its second warm-up thing took that
                      many seconds): the killer's clock starts
  B <t> <i> <what>    thing i begins (what comes before its writes, then its writes)
  E <t> <i> <what>    thing i is committed (its manifest was created)
  X <error>           the writer failed on its own: the test fails with this line

`t` is time.monotonic(). The functions that write one thing are the same ones the test calls in
process for its reruns and its failing storage.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
import traceback
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcml import registry
from dcml.batch import predict_batch
from dcml.config import PipelineConfig, parse_config
from dcml.data.catalog import dataset_folder
from dcml.data.clean import ReadAndClean, keep_rows
from dcml.data.columns import infer_columns
from dcml.data.gate import GateSpec
from dcml.data.sources import read_schema, resolve_files
from dcml.data.split import SPLITS
from dcml.data.transforms import Preprocessor
from dcml.data.write import ShardTask, content_hash
from dcml.storage import Commit, Storage

# ---- one thing each: what the platform's writers do around their writes ----------------------


def register_one(storage: Storage, name: str, checkpoint: str, meta: dict, token: str):
    """A model version (`registry.register`: claim, weights, model.json) whose lineage holds
    `token`, which names this one registration."""
    return registry.register(storage, name, checkpoint, {**meta, "lineage": {"token": token}})


class RawInput:
    """A dataset's raw files, read once: what `preprocess` resolves and ships to its tasks."""

    def __init__(self, cfg: PipelineConfig, storage: Storage):
        d = cfg.data
        options = storage.options if d.storage_options is None else d.storage_options
        self.fs, self.files, self.fmt = resolve_files(d.source, d.format, options)
        self.cols = infer_columns(d, read_schema(self.fs, self.files[0], self.fmt), self.files[0])
        self.data = [self.fs.cat_file(f) for f in self.files]


def write_dataset_version(
    cfg: PipelineConfig, storage: Storage, raw: RawInput, version: str, pre: Preprocessor
) -> dict[str, Any]:
    """The write half of `dcml.data.preprocess._build` without Ray: the same `ReadAndClean`,
    `keep_rows` and `ShardTask` (one call per raw file, as one Ray task per block would make
    them), then the same `Commit` of a manifest under datasets/<name>/<version>/ (fewer keys than
    preprocess stores: the ones the catalog and its checks read). `pre` stands for the fitted
    transforms; cfg.seed picks the split, as it does in preprocess."""
    d, cols = cfg.data, raw.cols
    classes = [0, 1]
    clean = ReadAndClean(
        raw.fs, raw.files, raw.fmt, cols, cfg.seed, d.split, d.dedupe, d.invalid_labels
    )
    blocks = [clean.read(i, data) for i, data in enumerate(raw.data)]
    keep = keep_rows(np.empty(0, dtype=np.int64), classes, cols.task)
    features = pre.output_features
    spec = GateSpec(features, cols.task, len(classes), raw.files, d.gate)
    commit = Commit(storage, dataset_folder(storage, d.name, version))
    task = ShardTask(
        storage, commit.base, keep, pre, spec, None, d.augment, [], d.split["train"], cfg.seed
    )
    try:
        shards = [s for b in blocks for s in task(b)["shards"]]
        commit.add([{k: s[k] for k in ("bytes", "sha256")} | {"path": s["name"]} for s in shards])
        for s in shards:
            s["name"] = commit.relative(s["name"])
        shards.sort(key=lambda s: s["name"])
        manifest = {
            "name": d.name,
            "version": version,
            "content_hash": content_hash(shards, commit.prefix),
            "created_at": time.time(),
            "source": d.source,
            "task": cols.task,
            "label": "label",
            "id_column": "id",
            "classes": classes,
            "features": features,
            "rows": {s: sum(x["rows"] for x in shards if x["split"] == s) for s in SPLITS},
            "shards": shards,
            "preprocessor": pre.to_json(),
            "config": {"seed": cfg.seed},
        }
        return commit.commit(manifest)
    except BaseException:  # as preprocess does (it also reuses the winner on FileExistsError)
        commit.abort()
        raise


def input_batches(n: int, rows: int) -> list[pa.Table]:
    """Raw records for the tiny categorical model (x, color) with ids: n files' worth."""
    rng = np.random.default_rng(0)
    return [
        pa.table(
            {
                "id": np.arange(b * rows, (b + 1) * rows, dtype=np.int64),
                "x": rng.normal(size=rows),
                "color": rng.choice(["red", "blue", "green"], rows).tolist(),
            }
        )
        for b in range(n)
    ]


def write_predictions(storage: Storage, model_ref: str, input_uri: str, output_uri: str) -> dict:
    """`dcml predict MODEL -i INPUT -o OUTPUT` where no cluster runs: `predict_batch` with the
    local engine (threads in this process), its files and its `Commit`."""
    cfg = parse_config(
        {
            "storage": {"root": storage.uri(), "storage_options": storage.options},
            "predict": {"engine": "local"},
        }
    )
    return predict_batch(cfg, model_ref, input_uri, output_uri)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# ---- the writers: one kind each, looping until killed ------------------------------------------


# Each writer first writes two things of its kind under the warm-up root (a root of its own, which
# the test does not check), so that what comes before a thing's writes (imports, first requests,
# first torch and Arrow calls) is done before its killer's clock starts, and kills fall in writes.
# The second one's duration (a warm one's, on the machine as busy as it is now) sets the clock.


def _warm_up(write) -> float:
    """Seconds the second of two calls of write(n) took."""
    write(0)
    t = time.monotonic()
    write(1)
    return time.monotonic() - t


def _register(cmd: dict, mark) -> None:
    options = _with_session(cmd["options"])
    storage = Storage(cmd["root"], options)
    warm = Storage(cmd["warmup"], options)
    pid = os.getpid()
    took = _warm_up(
        lambda n: register_one(warm, "warmup", cmd["checkpoint"], cmd["meta"], f"w{pid}.{n}")
    )
    mark(f"R {took:.6f}")
    for i in range(cmd["count"]):
        token = f"{os.getpid()}.{i}"
        mark(f"B {i} {token}")
        mv = register_one(storage, cmd["name"], cmd["checkpoint"], cmd["meta"], token)
        mark(f"E {i} {token} {mv.version}")


def _preprocess(cmd: dict, mark) -> None:
    cfg = parse_config(cmd["config"])
    cfg.storage.storage_options = _with_session(cfg.storage.storage_options)
    storage = Storage.from_config(cfg)
    raw = RawInput(cfg, storage)
    pre = Preprocessor(**cmd["pre"])
    warm, pid = Storage(cmd["warmup"], storage.options), os.getpid()
    took = _warm_up(lambda n: write_dataset_version(cfg, warm, raw, f"w{pid}.{n}", pre))
    mark(f"R {took:.6f}")
    for i, (seed, version) in enumerate(cmd["versions"]):
        cfg_i = cfg.model_copy(update={"seed": seed})
        mark(f"B {i} {version}")
        write_dataset_version(cfg_i, storage, raw, version, pre)
        mark(f"E {i} {version}")


def _predict(cmd: dict, mark) -> None:
    storage = Storage(cmd["root"], _with_session(cmd["options"]))
    warm = f"{cmd['warmup']}/preds/{os.getpid()}"
    took = _warm_up(
        lambda n: write_predictions(storage, cmd["model_ref"], cmd["input"], f"{warm}.{n}")
    )
    mark(f"R {took:.6f}")
    for i, uri in enumerate(cmd["outputs"]):
        mark(f"B {i} {uri}")
        write_predictions(storage, cmd["model_ref"], cmd["input"], uri)
        mark(f"E {i} {uri}")


WRITERS = {"register": _register, "preprocess": _preprocess, "predict": _predict}


def _child(cmd: dict, ready: int) -> None:
    """A forked writer: never returns to the server's loop. It writes a byte to `ready` when
    it is set up, which starts its killer's clock."""
    code = 1
    try:
        fd = os.open(cmd["markers"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        log = os.open(cmd["markers"] + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)  # the server's stdout is its answers: nothing else may go there
        os.dup2(log, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)

        def mark(line: str) -> None:
            kind, _, rest = line.partition(" ")
            os.write(fd, f"{kind} {time.monotonic():.6f} {rest}".rstrip().encode() + b"\n")
            if kind == "R":
                os.write(ready, f"{rest}\n".encode())

        mark("S")
        try:
            WRITERS[cmd["kind"]](cmd, mark)
            code = 0
        except BaseException as e:
            traceback.print_exc()
            os.write(fd, f"X {type(e).__name__}: {e}".replace("\n", " | ").encode() + b"\n")
    finally:
        os._exit(code)


def _killer(writer: int, ready: int, at: float) -> None:
    """SIGKILL the writer `at` times its second warm-up's duration after it is ready; nothing if it
    ends before that (the pipe closes). Forked from the server, which reaps the writer only
    after this process: the writer's PID cannot have been reused when the signal goes."""
    try:
        os.close(0)  # the server's pipes to the test: only the server uses them
        os.close(1)
        warmup = os.read(ready, 64)
        if warmup:
            time.sleep(at * float(warmup))
            os.kill(writer, signal.SIGKILL)
    finally:
        os._exit(0)


SESSION = None  # one botocore session for every writer's S3 client: see _warm_s3_client


def _with_session(options: dict) -> dict:
    """S3 options with the server's botocore session (s3fs's `session` option): each writer's
    client reuses the service data it loaded instead of parsing it again."""
    return {**options, "session": SESSION} if "endpoint_url" in options else options


def _warm_s3_client() -> None:
    """Create (and close) one S3 client, without a request, so that each writer does not import
    botocore's client machinery and load its data again (a second of CPU each, here)."""
    import asyncio

    from aiobotocore.session import AioSession

    global SESSION
    SESSION = AioSession()

    async def client() -> None:
        async with SESSION.create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="unused",
            aws_secret_access_key="unused",
        ):
            pass

    asyncio.run(client())


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the test stops it by closing stdin
    _warm_s3_client()
    killers: dict[int, int] = {}  # writer PID -> its killer's PID

    def answer(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({"ready": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "start":
            sys.stdout.flush()
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                _child(cmd, w)
            killer = os.fork()
            if killer == 0:
                os.close(w)
                _killer(pid, r, cmd["kill_at"])
            os.close(r)
            os.close(w)
            killers[pid] = killer
            answer({"pid": pid})
        elif cmd["op"] == "wait":  # until the writer is dead: its killer first
            os.waitpid(killers.pop(cmd["pid"]), 0)
            pid, status = os.waitpid(cmd["pid"], 0)
            answer(
                {
                    "pid": pid,
                    "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                    "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                }
            )
    for pid, killer in killers.items():  # the test stopped early: end its writers now
        for p in (killer, pid):
            os.kill(p, signal.SIGKILL)
            os.waitpid(p, 0)


if __name__ == "__main__":
    main()
