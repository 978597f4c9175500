"""`dcml serve` as a user or an orchestrator runs it: a process with its own Ray, what it listens
on, and SIGTERM under load."""

import ipaddress
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import psutil
import pytest
import requests

from dcml.storage import Storage

from .conftest import free_port, register_tiny_model
from .ray_nodes import BIN

pytestmark = pytest.mark.slow

# Ray's own servers listen on every interface (Ray binds them so): its processes' gRPC ports
# (the driver's is the `dcml` process's), guarded by Ray's token auth, on by default for the
# embedded Ray; and the dashboard's and autoscaler's Prometheus pages (Python processes, fixed
# ports, read-only metrics). docs/security.md lists them.
RAY_GRPC = ("gcs_server", "raylet", "dcml", "ray::")
RAY_METRICS_PAGES = {44217, 44227}
DIRECT_INGRESS = range(30000, 31001)  # a replica's own HTTP port: on serve.host


def listeners(root: psutil.Process) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of `root` and its
    descendants."""
    pids = {p.pid: p.name() for p in [root, *root.children(recursive=True)]}
    return [
        (c.laddr.ip, c.laddr.port, pids[c.pid])
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def test_dcml_serve_listens_on_loopback_and_a_sigterm_drains_the_requests_in_flight(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    ref = register_tiny_model(storage, tmp_path / "model")
    port = free_port()
    settings = {
        "storage.root": storage.root,
        "serve.port": port,
        "serve.num_cpus": 0.25,
        # a request waits a second in its replica for others to batch with: in flight long
        # enough to be drained
        "serve.batch_wait_s": 1,
        "serve.max_batch_size": 10_000,
        "serve.reload_s": 0,
    }
    # its own Ray, HAProxy and ports: nothing of the session Ray's that this process may hold
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS"))}
    env["RAY_enable_metrics_collection"] = "0"
    command = [str(BIN / "dcml"), "serve", ref]
    for k, v in settings.items():
        command += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 180
        while not any(line.startswith("serving ") for line in lines):
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)

        root = psutil.Process(proc.pid)
        started = root.children(recursive=True)  # the Ray it started, HAProxy, replicas
        found = listeners(root)
        assert ("127.0.0.1", port, "haproxy") in found, found
        assert [f for f in found if f[2] == "haproxy" and not loopback(f[0])] == []
        exposed = [f for f in found if not loopback(f[0])]
        for _, p, name in exposed:
            ray_metrics = name == "python" and p in RAY_METRICS_PAGES
            assert name.startswith(RAY_GRPC) or ray_metrics, exposed
            assert p != port and p not in DIRECT_INGRESS, exposed
        assert any(p in DIRECT_INGRESS and loopback(a) for a, p, _ in found), found

        url = f"http://127.0.0.1:{port}/predict"
        calls: list[tuple[float, float, object]] = []  # (sent, answered, status or error)

        def client() -> None:
            while proc.poll() is None:
                sent = time.time()
                try:
                    status = requests.post(url, json={"x": 1.0, "color": "red"}, timeout=30)
                    calls.append((sent, time.time(), status.status_code))
                except requests.RequestException as e:
                    calls.append((sent, time.time(), type(e).__name__))
                if calls[-1][2] != 200:
                    time.sleep(0.05)  # stopping: no busy loop beside the drain

        clients = [threading.Thread(target=client) for _ in range(6)]
        for t in clients:
            t.start()
        while sum(s == 200 for *_, s in calls) < 6:
            assert time.time() < deadline, calls[-5:]
            time.sleep(0.1)
        time.sleep(0.5)  # halfway through the next batch's wait
        stopped = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
        for t in clients:
            t.join()
        _, alive = psutil.wait_procs(started, timeout=30)
        assert alive == [], alive  # none left behind
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    # sent well before the signal (not in flight on the way in) and not answered by then
    in_flight = [s for sent, answered, s in calls if sent < stopped - 0.2 and answered > stopped]
    print(f"SIGTERM: {Counter(in_flight)} in flight; all: {Counter(s for *_, s in calls)}")
    assert len(in_flight) >= 3 and set(in_flight) == {200}, calls
    after = "".join(lines).split("Ctrl-C stops\n", 1)[1]
    assert after.startswith("stopping: "), after
    assert "Traceback" not in after and "SIGTERM" not in after, after
