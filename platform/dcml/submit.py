"""`dcml submit`: a stage sent to a cluster as a Ray job (`jobs/STAGE.py`).

A job runs on the cluster from the uploaded working directory, with dcml itself shipped as a
`py_modules` entry of `jobs/runtime_env.yaml`, so the cluster needs only Ray and torch. What the
job runs there is `dcml.job_entry`.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
# stages with an entry point jobs/STAGE.py
STAGES = ("pipeline", "preprocess", "train", "tune")
# the option that names a stage's run: a job given a stored one resumes it
ID_FLAGS = {"train": "--run-id", "tune": "--sweep-id"}


def runtime_env(path: Path = RUNTIME_ENV) -> dict[str, Any]:
    """The jobs' runtime env, its local paths made absolute (so it works from any directory)."""
    env = yaml.safe_load(path.read_text())
    env["py_modules"] = [str((REPO / p).resolve()) for p in env.get("py_modules", [])]
    env["working_dir"] = str(REPO)
    return env


def submit(
    address: str,
    stage: str,
    config: str,
    overrides: list[str],
    run_id: str | None = None,
    env_file: Path | None = None,
) -> str:
    """Submit `jobs/STAGE.py` to the cluster at `address`; returns the job id."""
    from ray.job_submission import JobSubmissionClient

    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: one of {', '.join(STAGES)}")
    cfg_path = Path(config).resolve()
    if not cfg_path.is_relative_to(REPO):
        raise ValueError(f"config {config}: must be inside {REPO}, which the job uploads")
    entry = ["python", f"jobs/{stage}.py", "--config", str(cfg_path.relative_to(REPO))]
    for o in overrides:
        refuse_secret(o)
        entry += ["--set", o]
    if run_id and stage in ID_FLAGS:
        entry += [ID_FLAGS[stage], run_id]
    return submit_entrypoint(
        JobSubmissionClient(address), shlex.join(entry), runtime_env(env_file or RUNTIME_ENV)
    )


# Words in an fsspec storage option's name that mark a credential (s3fs key/secret/token, gcsfs
# token, adlfs account_key/sas_token/connection_string/client_secret, passwords).
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "connection_string", "sas")


def refuse_secret(override: str) -> None:
    """A job's entrypoint is shown to everyone who can see the cluster (the dashboard, `ray job
    list`, the job's logs): a credential given with `--set` is refused before it goes there."""
    path, _, value = override.partition("=")
    path = path.strip()
    if path == "serve.auth_token":
        raise ValueError(
            "--set serve.auth_token: a job's command line is shown in the dashboard and `ray job "
            "list`; give the replicas the token with serve.auth_token_env or serve.auth_token_file"
        )
    section, _, rest = path.partition(".")
    if section not in ("storage", "data") or not rest.startswith("storage_options"):
        return
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return  # the job reports the bad value itself
    names = [rest.removeprefix("storage_options").lstrip(".")]
    if isinstance(parsed, dict):
        names = [str(k) for k in parsed]
    secret = [n for n in names if any(w in n.lower() for w in SECRET_WORDS)]
    if secret:
        raise ValueError(
            f"--set {section}.storage_options: {', '.join(secret)} would be shown in the "
            "dashboard and `ray job list` with the job's command line; give the cluster's nodes "
            "their credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an instance role, "
            "GOOGLE_APPLICATION_CREDENTIALS) and pass only the other options, such as "
            "endpoint_url"
        )


def submit_entrypoint(client, entrypoint: str, env: dict[str, Any], wait_s: float = 60) -> str:
    """Submit, waiting out a head whose job agent has not started yet (a new cluster answers
    "No available agent to submit job" for its first seconds)."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=env)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1)
