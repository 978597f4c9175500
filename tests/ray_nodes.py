"""Ray nodes as real `ray start --block` processes on loopback, each in a process group of its own
(so a test can stop one node, or kill it to simulate losing the machine), beside the test
session's own Ray: every port a node opens is a free one, never a default. The nodes run in a thin
virtualenv over this environment (`node_env`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

import requests
from ray.util.state.exception import RayStateApiException

from .conftest import REPO, free_port

BIN = Path(sys.executable).parent
# A local test cluster: no token (a real cluster keeps Ray's token auth). Its processes import
# serve_apps as a cluster image holding the repository would (`serve deploy` uploads no code).
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    # the test S3 server's credentials, in the nodes' environment as a cluster's would be: a job's
    # command line (shown in the dashboard) carries none
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "RAY_enable_metrics_collection": "0",  # as the session's Ray (conftest): no test reads them
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


def node_env(folder: Path, dashboard: str) -> dict[str, str]:
    """The environment of the nodes of the cluster whose head's dashboard is at `dashboard`: ENV
    with a virtualenv made in `folder` over this one (whose site-packages a .pth file adds: Ray,
    torch, dcml and its dependencies) first on PATH, so that a job's `python` is that Python, as
    in a cluster image.

    A thin virtualenv, because Ray builds a `pip` runtime env on a node that runs in a virtualenv
    by copying that virtualenv whole: a few files here, where this one is 2 GB (20-50 s a node
    on a 2-core machine)."""
    venv_dir = folder / "node-venv"
    if not venv_dir.exists():
        venv.EnvBuilder(with_pip=False, symlinks=True).create(venv_dir)
        site_packages = next((venv_dir / "lib").glob("python*/site-packages"))
        outer = dict.fromkeys(sysconfig.get_path(p) for p in ("purelib", "platlib"))
        (site_packages / "_outer_env.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in outer)
        )
        ray = venv_dir / "bin" / "ray"  # Ray's own script, for this Python
        ray.write_text(
            f"#!{venv_dir}/bin/python\n"
            "import sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n"
        )
        ray.chmod(0o755)
    return {
        **ENV,
        # Ray's state API in the cluster's own processes (Ray Train's PlacementGroupCleaner asks it
        # whether the train controller still lives) finds the cluster by its address, not by
        # guessing among the Ray instances on this machine ("Found multiple active Ray instances")
        "RAY_API_SERVER_ADDRESS": dashboard,
        # the GCS checks each node every second, not 3: a node that is gone (its raylet answers
        # nothing) counts as dead after 5 failed checks, ~5 s instead of ~15
        "RAY_health_check_period_ms": "1000",
        "VIRTUAL_ENV": str(venv_dir),
        "PATH": os.pathsep.join([str(venv_dir / "bin"), os.environ.get("PATH", "")]),
    }


# the session's Ray already holds the agents' default ports (52365, ...)
PORT_OPTIONS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


class Node:
    """A node with a temp dir of its own, as a node on another machine would have (nodes sharing
    a session folder install the same runtime env into the same place at once, and break it),
    which `remove_files` deletes."""

    def __init__(self, log: Path, env: dict[str, str], *args: str):
        self.log = log
        self.env = env
        # short: Ray's socket paths under it must stay within the 107 bytes a socket path allows
        self.temp_dir = tempfile.mkdtemp(prefix="dcml-ray-")
        bin_dir = Path(env["VIRTUAL_ENV"]) / "bin"
        self.proc = subprocess.Popen(
            [
                str(bin_dir / "python"),
                str(bin_dir / "ray"),
                "start",
                "--block",
                *(f"--{name}={free_port()}" for name in PORT_OPTIONS),
                "--object-store-memory=200000000",
                "--disable-usage-stats",
                f"--temp-dir={self.temp_dir}",
                *args,
            ],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def kill(self) -> None:
        """The machine is gone: SIGKILL every process of the node at once. Ray starts its worker
        processes in process groups of their own, so killing the node's group alone leaves them
        running (and training) without their raylet."""
        import psutil

        family = []
        if self.proc.poll() is None:  # not reaped: the pid is still this node's
            try:
                root = psutil.Process(self.proc.pid)
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the node's whole process group (raylet, agents) and wait for it."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def remove_files(self) -> None:
        """Delete the node's temp dir (its session: logs, runtime envs), once it is stopped or
        killed."""
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Head(Node):
    """The head: GCS, dashboard (jobs API) on loopback."""

    def __init__(self, tmp: Path, num_cpus: int):
        self.port, dash = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dash}"  # the dashboard: jobs are submitted here
        self.gcs = f"127.0.0.1:{self.port}"
        super().__init__(
            tmp / "head.log",
            node_env(tmp, self.address),
            "--head",
            f"--port={self.port}",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
        )
        try:
            deadline = time.time() + 120
            while True:
                assert self.alive(), self.tail()
                try:
                    if requests.get(f"{self.address}/api/version", timeout=2).ok:
                        # the head node itself registers with its GCS apart from the dashboard
                        if heads := [n for n in alive_nodes(self) if n.is_head_node]:
                            self.node_id = heads[0].node_id
                            break
                except (requests.RequestException, RayStateApiException):
                    pass
                assert time.time() < deadline, "the head did not come up"
                time.sleep(0.5)
        except BaseException:
            self.kill()
            self.remove_files()
            raise


class Worker(Node):
    """A worker node joining `head`; `joined` waits until the cluster counts it alive."""

    def __init__(self, tmp: Path, head: Head, num_cpus: int, name: str):
        self.head = head
        self.node_id = ""
        # the nodes the cluster knew before this one: the new node is the one that is not there
        self.known = {n.node_id for n in nodes(head)}
        super().__init__(
            tmp / f"{name}.log",
            head.env,
            f"--address={head.gcs}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
        )

    def joined(self, timeout: float = 120) -> bool:
        """Whether the node registered with the cluster (as ALIVE) within `timeout` seconds:
        False when its `ray start` exited first."""
        deadline = time.time() + timeout
        while self.alive() and time.time() < deadline:
            new = [
                n.node_id
                for n in alive_nodes(self.head)
                if n.node_id not in self.known and not n.is_head_node
            ]
            if new:
                self.node_id = new[0]
                return True
            time.sleep(1)
        return False


def add_worker(
    tmp: Path, head: Head, num_cpus: int, name: str, started: Worker | None = None, tries: int = 3
) -> Worker:
    """A worker node that has joined (`started`, a node already starting, or a new one): on a
    loaded 2-core machine a raylet sometimes misses `ray start`'s fixed 30 s to register ("The
    current node timed out during startup"); such a node exits, and another is started in its
    place."""
    node = started
    for attempt in range(tries):
        node = node or Worker(tmp, head, num_cpus, f"{name}-{attempt}")
        try:
            if node.joined():
                return node
        except BaseException:
            node.kill()
            node.remove_files()
            raise
        failed, node = node, None
        failed.kill()
        failed.remove_files()
    raise AssertionError(f"no worker node joined in {tries} tries: {failed.tail()}")


def nodes(head: Head) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=head.address)


def alive_nodes(head: Head) -> list:
    return [n for n in nodes(head) if n.state == "ALIVE"]


def wait_until_gone(head: Head, node_id: str, timeout: float = 120) -> None:
    """Wait until the cluster has seen the node go (it no longer counts it alive)."""
    deadline = time.time() + timeout
    while node_id in {n.node_id for n in alive_nodes(head)}:
        assert time.time() < deadline, f"the cluster still counts node {node_id} alive"
        time.sleep(1)
