"""Ray jobs for real: a `ray start --head` cluster on loopback, stages submitted with the `ray job
submit` CLI and with `dcml submit`, followed with `ray job logs`, outputs checked in storage."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from .conftest import REPO, free_port

# with the session's Ray running beside the head, as in the full suite (they must not collide)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

BIN = Path(sys.executable).parent
# a local test cluster: no token (a real cluster keeps Ray's token auth)
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` in a process group of its own; yields the dashboard address."""
    dash, port = free_port(), free_port()
    tmp = tmp_path_factory.mktemp("head")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            # the session's Ray already holds the agents' default ports (52365, ...)
            *(
                f"--{name}={free_port()}"
                for name in (
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "metrics-export-port",
                    "runtime-env-agent-port",
                    "ray-client-server-port",
                    "node-manager-port",
                    "object-manager-port",
                )
            ),
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--object-store-memory=300000000",
            "--disable-usage-stats",
        ],
        stdout=open(tmp / "head.log", "w"),
        stderr=subprocess.STDOUT,
        env=ENV,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the head's dashboard did not come up"
            time.sleep(0.5)
        # the dashboard answers before the head's job agent runs: wait until a job goes through
        from ray.job_submission import JobStatus, JobSubmissionClient

        from dcml.jobs import submit_entrypoint

        client = JobSubmissionClient(address)
        job = submit_entrypoint(client, "python -c pass", {}, wait_s=120)
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            assert time.time() < deadline + 120, "the head ran no job"
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the head and every process it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # `ray start` noted this cluster as the machine's current one: forget it, it is gone
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def ray_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ray_job_submit_runs_a_stage_with_dcml_shipped_in_the_runtime_env(head, tmp_path):
    store = tmp_path / "store"
    submitted = ray_cli(
        "job",
        "submit",
        "--address",
        head,
        "--working-dir",
        ".",
        "--runtime-env",
        "jobs/runtime_env.yaml",
        "--",
        "python",
        "jobs/preprocess.py",
        "--config",
        "configs/breast_cancer.yaml",
        "--set",
        f"storage.root={store}",
    )
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, out[-4000:]
    job_id = re.search(r"Job '(\S+)' submitted successfully", out)[1]
    assert re.search(r"Job '\S+' succeeded", out), out[-2000:]

    logs = ray_cli("job", "logs", job_id, "--address", head).stdout
    # dcml came from the uploaded py_module, not from this machine's install
    shipped = re.search(r"\[dcml\] job: preprocess with dcml from (\S+)", logs)[1]
    assert "runtime_resources" in shipped and str(REPO) not in shipped
    ref = re.search(r"dataset: (breast_cancer@\S+)", logs)[1]
    name, version = ref.split("@")
    manifest = json.loads((store / "datasets" / name / version / "_manifest.json").read_text())
    assert manifest["rows"]["train"] > 300


def test_dcml_submit_prints_the_job_and_how_to_follow_it(head, tmp_path):
    from dcml.cli import main

    store = tmp_path / "store"
    args = ["submit", "configs/breast_cancer.yaml", "--stage", "preprocess", "--address", head]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main([*args, "--set", f"storage.root={store}"]) == 0
        assert main([*args, "--set", "data.sorce=x"]) == 2  # a bad config fails before submitting
    finally:
        os.chdir(cwd)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head)
    [job] = [
        j
        for j in client.list_jobs()
        if "jobs/preprocess.py" in j.entrypoint and str(store) in j.entrypoint
    ]
    deadline = time.time() + 600
    while client.get_job_status(job.submission_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        assert time.time() < deadline
        time.sleep(1)
    logs = client.get_job_logs(job.submission_id)
    assert client.get_job_status(job.submission_id) == JobStatus.SUCCEEDED, logs[-3000:]
    assert list((store / "datasets" / "breast_cancer").glob("*/_manifest.json"))
