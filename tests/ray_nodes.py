"""Ray nodes as real `ray start --block` processes on loopback, each in a process group of its own
(so a test can stop one node, or kill it to simulate losing the machine), beside the test
session's own Ray: every port a node opens is a free one, never a default."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from .conftest import REPO, free_port

BIN = Path(sys.executable).parent
# A local test cluster: no token (a real cluster keeps Ray's token auth). Its processes import
# serve_apps as a cluster image holding the repository would (`serve deploy` uploads no code).
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
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
    def __init__(self, log: Path, *args: str):
        self.log = log
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                *(f"--{name}={free_port()}" for name in PORT_OPTIONS),
                "--object-store-memory=200000000",
                "--disable-usage-stats",
                *args,
            ],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env=ENV,
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

        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
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


class Head(Node):
    """The head: GCS, dashboard (jobs API) on loopback."""

    def __init__(self, tmp: Path, num_cpus: int):
        self.port, dash = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dash}"  # the dashboard: jobs are submitted here
        self.gcs = f"127.0.0.1:{self.port}"
        super().__init__(
            tmp / "head.log",
            "--head",
            f"--port={self.port}",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}",
            "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
        )
        deadline = time.time() + 120
        while True:
            assert self.alive(), self.tail()
            try:
                if requests.get(f"{self.address}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the head's dashboard did not come up"
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        super().stop(sig)
        self._forget()

    def kill(self) -> None:
        super().kill()
        self._forget()

    def _forget(self) -> None:
        # `ray start` noted this cluster as the machine's current one: forget it, it is gone
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{self.port}"):
            current.unlink()


class Worker(Node):
    """A worker node joined to `head` (`wait_for_nodes` waits until the cluster counts it).

    It has a temp dir of its own, as a node on another machine would: nodes sharing the head's
    session folder install the same runtime env into the same place at once, and break it."""

    def __init__(self, tmp: Path, head: Head, num_cpus: int, name: str):
        # short: Ray's socket paths under it must stay within the 107 bytes a socket path allows
        self.temp_dir = tempfile.mkdtemp(prefix="dcml-ray-")
        super().__init__(
            tmp / f"{name}.log",
            f"--address={head.gcs}",
            f"--temp-dir={self.temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        super().stop(sig)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def kill(self) -> None:
        super().kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def add_worker(
    tmp: Path, head: Head, num_cpus: int, name: str, count: int, tries: int = 3
) -> Worker:
    """A worker node that has joined, making `count` alive nodes: on a loaded 2-core machine a
    raylet sometimes misses `ray start`'s fixed 30 s to register ("The current node timed out
    during startup"); such a node exits, and another is started in its place."""
    for attempt in range(tries):
        node = Worker(tmp, head, num_cpus, f"{name}-{attempt}")
        deadline = time.time() + 120
        while node.alive() and len(alive_nodes(head)) < count and time.time() < deadline:
            time.sleep(1)
        if node.alive() and len(alive_nodes(head)) >= count:
            return node
        node.kill()
    raise AssertionError(f"no worker node joined in {tries} tries: {node.tail()}")


def alive_nodes(head: Head) -> list[dict]:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=head.address) if n.state == "ALIVE"]


def wait_for_nodes(head: Head, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(alive_nodes(head)) != count:
        assert time.time() < deadline, f"the cluster did not reach {count} alive nodes"
        time.sleep(1)
