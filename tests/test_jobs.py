"""Ray jobs on a real two-node cluster on loopback (`ray start --head` and a worker node, storage on
an S3 API server): stages submitted with the `ray job submit` CLI and with `dcml submit`, followed
with `ray job logs`, outputs checked in storage; a node killed mid-training, and the run resumed by
submitting the job again; `serve deploy` of the Serve config file through the head's dashboard."""

import csv
import io
import os
import re
import subprocess
import time
from types import SimpleNamespace

import pytest
import requests
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from dcml.cli import main
from dcml.storage import Storage
from dcml.submit import RUNTIME_ENV, submit_entrypoint

from .conftest import REPO, free_port, moto_s3, register_tiny_model
from .ray_nodes import BIN, ENV, Head, Worker, add_worker, wait_until_gone

# with the session's Ray running beside the head, as in the full suite (they must not collide)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes on loopback: a head and a worker node, one CPU each, so that work spreads."""
    tmp = tmp_path_factory.mktemp("cluster")
    head = Head(tmp, num_cpus=1)
    # every node started, for the teardown (`worker` is the worker node of the moment)
    nodes: list = [head]
    try:
        nodes.append(Worker(tmp, head, num_cpus=1, name="worker-1-0"))
        # the dashboard answers before the head's job agent runs: wait until a job goes through
        # (while the worker node starts)
        client = JobSubmissionClient(head.address)
        wait_job(client, submit_entrypoint(client, "python -c pass", {}, wait_s=120), 240)
        worker = add_worker(tmp, head, num_cpus=1, name="worker-1", started=nodes[-1])
        if worker is not nodes[-1]:  # it failed to join, and another took its place
            nodes.append(worker)
        yield SimpleNamespace(head=head, worker=worker, nodes=nodes, tmp=tmp, client=client)
    finally:
        for node in reversed(nodes):
            node.kill()  # a clean stop takes ~25 s and there is nothing to keep
        for node in nodes:
            node.remove_files()


def wait_job(client, job: str, timeout: float = 600) -> tuple[JobStatus, str]:
    deadline = time.time() + timeout
    while (status := client.get_job_status(job)) not in (
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    ):
        assert time.time() < deadline, f"{job} {status}: {client.get_job_logs(job)[-3000:]}"
        time.sleep(1)
    return status, client.get_job_logs(job)


def ray_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def s3_store():
    """Storage on an S3 API server (moto), so no node relies on another's disk: `--set` flags."""
    with moto_s3("dcml-cluster") as options:
        # the jobs' credentials come from the nodes' environment (ray_nodes.ENV), not --set
        flow = "{endpoint_url: '" + options["endpoint_url"] + "'}"
        root = "s3://dcml-cluster/store"
        overrides = [f"storage.root={root}", f"storage.storage_options={flow}"]
        yield SimpleNamespace(storage=Storage(root, options), overrides=overrides)


@pytest.fixture(scope="module")
def preprocess_job(cluster, s3_store) -> str:
    """The preprocess stage submitted with the `ray job submit` CLI, as the README shows: the
    module's one job with the whole runtime env, `pip` list included (Ray builds its environment
    on each node the job runs on: both)."""
    submitted = ray_cli(
        "job",
        "submit",
        "--address",
        cluster.head.address,
        "--working-dir",
        ".",
        "--runtime-env",
        "jobs/runtime_env.yaml",
        "--",
        "python",
        "jobs/preprocess.py",
        "--config",
        "configs/breast_cancer.yaml",
        *(f for o in s3_store.overrides for f in ("--set", o)),
    )
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, out[-4000:]
    assert re.search(r"Job '\S+' succeeded", out), out[-2000:]
    return re.search(r"Job '(\S+)' submitted successfully", out)[1]


def test_ray_job_submit_runs_a_stage_with_dcml_shipped_in_the_runtime_env(
    cluster, s3_store, preprocess_job
):
    logs = ray_cli("job", "logs", preprocess_job, "--address", cluster.head.address).stdout
    assert ray_lines(logs) == [], logs  # the job's output is dcml's own
    # dcml came from the uploaded py_module, not from this machine's install
    shipped = re.search(r"\[dcml\] job: preprocess with dcml from (\S+)", logs)[1]
    assert "runtime_resources" in shipped and str(REPO) not in shipped
    name, version = re.search(r"dataset: (breast_cancer@\S+)", logs)[1].split("@")
    storage = s3_store.storage
    manifest = storage.read_json(storage.path("datasets", name, version, "_manifest.json"))
    assert manifest["rows"]["train"] > 300
    # the stage's Ray Data tasks ran on both nodes, reading and writing S3
    assert len(nodes_of(cluster, preprocess_job, "task")) == 2


# two DDP workers of one CPU each: one on each node
TRAIN = ["train.workers=2", "train.cpus_per_worker=1"]


def dcml_submit(cluster, capsys, *args: str) -> tuple[str, str]:
    """`dcml submit CONFIG ARGS` as a user types it: the job id it printed, and its output."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = main(
            ["submit", "configs/breast_cancer.yaml", "--address", cluster.head.address, *args]
        )
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert code == 0, out
    job = re.search(r"submitted job (\S+)", out)[1]
    assert f"follow it: ray job logs --follow {job}" in out
    return job, out


def nodes_of(cluster, job: str, kind: str, name: str = "") -> set[str]:
    """Nodes that ran a job's tasks (kind "task") or actors of a class (kind "actor")."""
    from ray.util.state import list_actors, list_tasks

    ray_job = cluster.client.get_job_info(job).job_id
    if ray_job is None:  # its driver has not started yet
        return set()
    if kind == "actor":
        found = list_actors(
            address=cluster.head.address,
            filters=[("job_id", "=", ray_job), ("class_name", "=", name)],
            detail=True,
        )
    else:
        found = list_tasks(
            address=cluster.head.address,
            filters=[("job_id", "=", ray_job), ("type", "=", "NORMAL_TASK")],
            detail=True,
            limit=10_000,
        )
    return {x.node_id for x in found if x.node_id}


def wait_until(cluster, job: str, done, timeout: float = 300) -> None:
    """Poll `done()` while the job runs, until it returns True."""
    deadline = time.time() + timeout
    while not done():
        status = cluster.client.get_job_status(job)
        running = status in (JobStatus.PENDING, JobStatus.RUNNING)
        assert running and time.time() < deadline, cluster.client.get_job_logs(job)[-3000:]
        time.sleep(0.5)


def epochs_in_history(store, run_id: str) -> list[int]:
    with store.storage.fs.open(store.storage.path("runs", run_id, "history.csv")) as f:
        return [int(float(r["epoch"])) for r in csv.DictReader(io.TextIOWrapper(f))]


@pytest.fixture
def env_without_pip(tmp_path) -> list[str]:
    """`dcml submit --runtime-env` with jobs/runtime_env.yaml less its `pip` list: the test nodes'
    Python has dcml's dependencies already, and the `ray job submit` job above proves that Ray
    builds that list's environment on each node (dcml itself still travels with the job, a
    py_module)."""
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert env.pop("pip")
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return ["--runtime-env", str(path)]


def test_training_spreads_over_both_nodes_and_a_run_that_lost_a_node_resumes_when_resubmitted(
    cluster, s3_store, preprocess_job, env_without_pip, capsys
):
    sets = [f for o in s3_store.overrides for f in ("--set", o)]
    # max_failures=0: the job fails when its node goes (with retries, Ray Train would wait for
    # the CPUs to come back and restart the workers from the last checkpoint by itself)
    for o in (*TRAIN, "train.epochs=8", "train.max_failures=0"):
        sets += ["--set", o]
    bad = ["submit", str(REPO / "configs/breast_cancer.yaml"), "--set", "data.sorce=x"]
    assert main(bad) == 2  # a bad config fails here, before a job is submitted
    args = ["--stage", "train", "--run-id", "lost-node", *env_without_pip, *sets]
    job, out = dcml_submit(cluster, capsys, *args)
    assert "train lost-node: if the job dies, the same command with --run-id lost-node" in out
    assert "pip" not in cluster.client.get_job_info(job).runtime_env
    wait_until(cluster, job, lambda: "epoch 2/8" in cluster.client.get_job_logs(job))
    # one DDP worker on each node
    ddp_nodes = nodes_of(cluster, job, "actor", "RayTrainWorker")
    assert ddp_nodes == {cluster.head.node_id, cluster.worker.node_id}
    lost = cluster.worker
    lost.kill()  # the machine is gone: no clean shutdown
    # a new node starts at once, and joins while the job fails and the cluster sees the node go
    cluster.nodes.append(spare := Worker(cluster.tmp, cluster.head, 1, "worker-2-0"))
    status, logs = wait_job(cluster.client, job)
    assert status == JobStatus.FAILED, logs[-3000:]
    # why, in dcml's one line (DCML_DEBUG=1 shows the traceback)
    assert "\nerror: " in logs and "Traceback" not in logs, logs[-3000:]

    wait_until_gone(cluster.head, lost.node_id)  # the cluster has seen the node go
    cluster.worker = add_worker(cluster.tmp, cluster.head, 1, "worker-2", started=spare)
    if cluster.worker is not spare:  # it failed to join, and another took its place
        cluster.nodes.append(cluster.worker)
    # the same submission again: the stored run goes on from its last checkpoint
    job, _ = dcml_submit(cluster, capsys, *args)
    status, logs = wait_job(cluster.client, job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "lost-node is stored: resuming it" in logs
    assert "epoch 1/8" not in logs  # epoch 0 was not trained again
    assert "\nepoch 8/8 train_loss=" in logs and ray_lines(logs) == [], logs[-3000:]
    assert epochs_in_history(s3_store, "lost-node") == list(range(8))
    models = s3_store.storage.path("models", "breast_cancer")
    assert "1" in s3_store.storage.ls(models)  # registered, on S3
    # dcml came with the job (a py_module) here too
    assert "runtime_resources" in re.search(r"\[dcml\] job: train with dcml from (\S+)", logs)[1]


def ray_lines(logs: str) -> list[str]:
    """Ray's own lines in a job's output: its workers' and raylet's (forwarded with a prefix),
    its warnings and tracebacks, Ray Data's bars. dcml shows none at its default verbosity."""
    ray_own = ("pid=", "core_worker", "(raylet)", "WARNING", "Traceback", "Running Dataset")
    return [line for line in logs.splitlines() if any(r in line for r in ray_own)]


def serve_cli(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "serve"), *args, "--address", cluster.head.address],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_serve_deploy_runs_the_config_file_on_the_cluster(cluster, s3_store, tmp_path):
    """`serve deploy` of serve_apps/config.yaml, as its comment shows, with the model and storage
    set: the replica loads the version from S3 and answers over HTTP; `serve shutdown` ends it."""
    storage = s3_store.storage
    ref = register_tiny_model(storage, tmp_path / "model")
    config = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    port = free_port()
    config["proxy_location"] = "HeadOnly"  # every node is on this machine: one proxy per port
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(
        model=ref,
        storage_root=storage.uri(),
        storage_options=storage.options,
        num_cpus=0.25,
        reload_s=0,
    )
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deployed = serve_cli(cluster, "deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        url = f"http://127.0.0.1:{port}/predict"
        deadline = time.time() + 240
        while True:
            try:
                r = requests.post(url, json={"x": 1.0, "color": "red"}, timeout=10)
                if r.status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # a slow cold start
                pass
            assert time.time() < deadline, serve_cli(cluster, "status").stdout[-3000:]
            time.sleep(1)
        assert r.json()["model_version"] == ref
        bad = requests.post(url, json={"x": "one", "color": "red"}, timeout=10)
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "x"
        assert "RUNNING" in serve_cli(cluster, "status").stdout
    finally:
        stopped = serve_cli(cluster, "shutdown", "-y")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
