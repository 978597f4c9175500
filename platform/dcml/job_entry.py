"""What a dcml Ray job runs on the cluster: `python jobs/STAGE.py --config PATH [--set k=v ...]`
is `dcml STAGE PATH [--set k=v ...]`, and a job given the id of a stored run resumes it."""

from __future__ import annotations

import sys
from pathlib import Path

from dcml.submit import ID_FLAGS


def job_main(stage: str, argv: list[str] | None = None) -> int:
    """`python jobs/STAGE.py --config PATH [--set k=v ...] [stage options]` -> `dcml STAGE`."""
    from dcml.cli import main

    args = list(sys.argv[1:] if argv is None else argv)
    if "--config" in args:  # the job form names the config; the CLI takes it first
        i = args.index("--config")
        args = [*args[i + 1 : i + 2], *args[:i], *args[i + 2 :]]
    print(f"[dcml] job: {stage} with dcml from {Path(__file__).parent}", flush=True)
    return main(["run" if stage == "pipeline" else stage, *resume_if_stored(stage, args)])


def resume_if_stored(stage: str, args: list[str]) -> list[str]:
    """A job resubmitted with the id of a stored run or sweep continues it (`--resume ID`): a job
    that died with its node, or was stopped, is resubmitted unchanged."""
    from dcml.config import load_config
    from dcml.layout import RUN_JSON, run_folder
    from dcml.storage import Storage

    flag = ID_FLAGS.get(stage)
    if flag not in args:
        return args
    i = args.index(flag)
    run_id = args[i + 1]
    overrides = [args[k + 1] for k, a in enumerate(args) if a == "--set"]
    storage = Storage.from_config(load_config(Path(args[0]), overrides))
    if not storage.exists(f"{run_folder(storage, run_id)}/{RUN_JSON}"):
        return args
    print(f"[dcml] {run_id} is stored: resuming it", flush=True)
    return [*args[:i], "--resume", run_id, *args[i + 2 :]]
