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
from prometheus_client.parser import text_string_to_metric_families

from dcml.prediction_log import read_log
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
        # every record logged, written when the replica stops (not before)
        "serve.log_fraction": 1,
        "serve.log_flush_s": 600,
    }
    # its own Ray, HAProxy and ports: nothing of the session Ray's that this process may hold
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS"))}
    env["RAY_enable_metrics_collection"] = "1"  # the session's Ray turns them off
    env["RAY_metrics_report_interval_ms"] = "300"  # replicas report every 10 s by default
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
        metrics = next(line.split()[-1] for line in lines if line.startswith("metrics "))
        metrics_port = int(metrics.rsplit(":", 1)[1].split("/")[0])
        for _, p, name in exposed:
            ray_metrics = name == "python" and p in {*RAY_METRICS_PAGES, metrics_port}
            assert name.startswith(RAY_GRPC) or ray_metrics, exposed
            assert p != port and p not in DIRECT_INGRESS, exposed
        assert any(p in DIRECT_INGRESS and loopback(a) for a, p, _ in found), found

        url = f"http://127.0.0.1:{port}/predict"
        known = send_known_requests(url)
        scraped = scrape_until(f"http://127.0.0.1:{metrics_port}/metrics", known, deadline)
        assert scraped == known, (scraped, known)

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
    # dcml's lines only: not Ray's token-auth warning, Serve's banner or the raylet's notes
    ray_own = ("WARNING", "ServeController", "core_worker", "(raylet)", "pid=", "Traceback")
    assert [line for line in lines if any(r in line for r in ray_own)] == [], lines

    # every record answered, logged when its replica stopped: the known ones with their ids
    logged = read_log(storage, "cat", 1)
    answered = known[("dcml_records_scored_total", ())] + sum(s == 200 for *_, s in calls)
    assert logged.num_rows == answered, (logged.num_rows, answered)
    ids = [i for i in logged.column("id").to_pylist() if i]
    assert sorted(ids) == ["k0", "k1", "k2"], ids


def send_known_requests(url: str) -> dict:
    """Requests whose metrics are known: three records with ids, one list of two (a missing x,
    an unseen and a missing color), one invalid; the counts the metrics must reach."""
    for i in range(3):
        answer = requests.post(url, json={"id": f"k{i}", "x": 1.0, "color": "red"}, timeout=30)
        assert answer.json()["predictions"][0]["id"] == f"k{i}"
    pair = [{"x": None, "color": "green"}, {"x": 2.0, "color": None}]
    assert requests.post(url, json=pair, timeout=30).status_code == 200
    assert requests.post(url, json={"x": "high", "color": "red"}, timeout=30).status_code == 422
    return {
        ("dcml_requests_total", (("code", "200"),)): 4,
        ("dcml_requests_total", (("code", "422"),)): 1,
        ("dcml_request_latency_ms_count", ()): 5,
        ("dcml_batch_records_count", ()): 4,
        ("dcml_records_scored_total", ()): 5,
        ("dcml_missing_values_total", (("column", "color"),)): 1,
        ("dcml_missing_values_total", (("column", "x"),)): 1,
        ("dcml_unknown_categories_total", (("column", "color"),)): 1,
    }


def scrape_until(url: str, expected: dict, deadline: float) -> dict:
    """The served model's metrics from Ray's Prometheus endpoint, once they reach `expected`
    (replicas report them every few hundred ms here), by name and the labels named there."""
    while True:
        found: dict = {}
        for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
            for sample in family.samples:
                name = sample.name.removeprefix("ray_")
                if not name.startswith("dcml_") or sample.labels.get("model") != "cat":
                    continue
                assert sample.labels["version"] == "1" and sample.labels["application"] == "dcml"
                keep = tuple((k, v) for k, v in sorted(sample.labels.items()) if k in LABELS)
                found[(name, keep)] = found.get((name, keep), 0) + sample.value
        got = {k: found.get(k) for k in expected}
        if got == expected or time.time() > deadline:
            classes = sum(v for (n, _), v in found.items() if n == "dcml_predictions_total")
            assert classes == expected[("dcml_records_scored_total", ())], found
            return got
        time.sleep(0.3)


LABELS = {"code", "column", "class"}
