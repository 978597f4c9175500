"""Ray Serve over real HTTP: batching (by record count, up to max_batch_size), a corpus of bad
requests, unknown categories, property-based requests from the OpenAPI schema, an alias switch under
load, a replica killed under load, and autoscaling up and down under load."""

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from ray import serve

from dcml import registry
from dcml.config import with_values
from dcml.http_app import BATCH_SIZE_HEADER
from dcml.pipeline import raw_test_rows, stage_register
from dcml.predictor import Predictor
from dcml.serving import app_builder, deploy, serve_args
from dcml.storage import Storage

from .conftest import make_config, preprocessed, quiet, register_tiny_model, trained_in_process

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """bc@1 (an MLP) and bc@2 (gradient-boosted trees) registered; bc@production -> 1 served
    by 2 replicas. The models are trained by the training loops in this process: these tests are
    about serving."""
    root, dv = preprocessed(tmp_path_factory.mktemp("serve") / "store")
    cfg = make_config(
        root,
        name="bc",
        train={"workers": 1, "epochs": 3},
        serve={
            "num_replicas": 2,
            "num_cpus": 0.25,
            "reload_s": 0.5,
            "auth_token": TOKEN,
            "max_request_bytes": 50_000,
        },
    )
    checkpoint = trained_in_process(cfg, dv, root / "runs" / "serve")
    v1 = stage_register(cfg, dv, checkpoint, {}, ["production"], quiet)
    trees = with_values(cfg, {"model.family": "gbdt", "model.gbdt.rounds": 40})
    other = trained_in_process(trees, dv, root / "runs" / "serve-2")
    v2 = stage_register(trees, dv, other, {}, [], quiet)
    url = deploy(cfg, "bc@production")
    storage = Storage.from_config(cfg)
    rows = [
        {c: r[c] for c in dv.preprocessor.inputs}
        for r in raw_test_rows(cfg, dv, limit=40).to_pylist()
    ]
    yield cfg, url, storage, rows, (v1, v2)
    serve.shutdown()  # the next module starts Serve on its own port


def post(url: str, body, **kw) -> requests.Response:
    return requests.post(f"{url}/predict", json=body, headers=AUTH, timeout=30, **kw)


@contextmanager
def extra_app(url: str, name: str, args: dict) -> Iterator[str]:
    """Another application beside `served`'s, at /NAME (one small replica unless `args` say
    otherwise): its URL. Deleted without waiting: behind HAProxy a replica drains for 30 s before it
    stops, and the module's `serve.shutdown` waits for that once, for every app at the same time."""
    defaults = {"num_cpus": 0.1, "reload_s": 0, "auth_token": TOKEN}
    serve.run(app_builder({**defaults, **args}), name=name, route_prefix=f"/{name}")
    try:
        yield f"{url}/{name}"
    finally:
        serve.delete(name, _blocking=False)


def test_concurrent_requests_are_batched_and_equal_the_offline_predictor(served):
    _, url, storage, rows, (v1, _) = served
    offline = Predictor.from_storage(storage, v1.path).predict_records(rows)
    with ThreadPoolExecutor(16) as pool:  # one record per request: Serve batches them
        singles = list(pool.map(lambda r: post(url, r), rows))
    assert all(r.status_code == 200 for r in singles)
    answered = [r.json()["predictions"][0] for r in singles]
    assert [a["probability"] for a in answered] == pytest.approx(
        [o["probability"] for o in offline], rel=1e-6
    )
    assert {a["model_version"] for a in answered} == {"bc@1"}
    many = post(url, rows).json()
    assert many["model_version"] == "bc@1" and len(many["predictions"]) == len(rows)

    meta = requests.get(f"{url}/metadata", headers=AUTH, timeout=10).json()
    assert (meta["model"], meta["version"], meta["alias"]) == ("bc", 1, "production")
    # every input, plus an optional id that answers and the prediction log carry
    assert set(meta["schema"]["properties"]) == {*rows[0], "id"}
    assert set(meta["schema"]["required"]) == set(rows[0])
    assert meta["metrics"]["test_roc_auc"] > 0.9
    assert requests.get(f"{url}/readyz", timeout=10).json()["model_version"] == "bc@1"
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert {"$ref": "#/components/schemas/Record"} in body["schema"]["anyOf"]
    assert set(spec["components"]["schemas"]["Record"]["required"]) == set(rows[0])


def test_the_ingress_is_haproxy_and_a_lone_request_is_not_batched(served):
    """The default ingress (cluster.serve_ingress: haproxy): the process listening on serve.port is
    HAProxy, on loopback. A request alone in its replica is predicted at once (batch size 1)."""
    import psutil

    cfg, url, _, rows, _ = served
    listening = [
        c
        for c in psutil.net_connections("tcp")
        if c.status == "LISTEN" and c.laddr.port == cfg.serve.port
    ]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"], listening
    assert psutil.Process(listening[0].pid).name() == "haproxy"
    for _ in range(3):
        r = post(url, rows[0])
        assert r.status_code == 200 and r.headers[BATCH_SIZE_HEADER] == "1"


def test_requests_are_merged_by_record_count_up_to_max_batch_size(served):
    """x-dcml-batch-size is the records predicted in the call that answered a request: concurrent
    requests of 1 to 3 records merge into batches of at most max_batch_size records, and a request
    larger than that alone is still answered (in slices of max_batch_size records)."""
    _, url, storage, rows, (v1, _) = served
    offline = Predictor.from_storage(storage, v1.path).predict_records(rows)
    spans = [(i, i + 1 + i % 3) for i in range(30)]  # requests of 1, 2 and 3 records
    args = {
        "model": "bc@1",
        "storage_root": storage.uri(),
        "max_batch_size": 8,
        "batch_wait_s": 0.5,
    }
    with extra_app(url, "batch8", args) as app:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda s: post(app, rows[s[0] : s[1]]), spans))
        big = post(app, rows[:20])
    assert [r.status_code for r in answers] == [200] * len(spans), [r.text[:200] for r in answers]
    for (start, end), r in zip(spans, answers):
        got = [p["probability"] for p in r.json()["predictions"]]
        assert got == pytest.approx([o["probability"] for o in offline[start:end]], rel=1e-6)
    sizes = [int(r.headers[BATCH_SIZE_HEADER]) for r in answers]
    print(f"batch sizes (records) of the answers: {sorted(Counter(sizes).items())}")
    assert all(end - start <= size <= 8 for (start, end), size in zip(spans, sizes)), sizes
    merged = [size > end - start for (start, end), size in zip(spans, sizes)]
    assert any(merged), f"no request was batched with another: {sizes}"
    # 20 records > max_batch_size: answered whole, by calls of at most 8 records
    assert big.status_code == 200, big.text[:300]
    assert [p["probability"] for p in big.json()["predictions"]] == pytest.approx(
        [o["probability"] for o in offline[:20]], rel=1e-6
    )
    assert int(big.headers[BATCH_SIZE_HEADER]) == 8


def bad_requests(good: dict, limit: int) -> dict[str, tuple[dict, int]]:
    """name -> (requests.post keyword arguments, expected status)."""
    field = next(iter(good))
    rest = {k: v for k, v in good.items() if k != field}
    js = {"Content-Type": "application/json", **AUTH}

    def raw(text: str) -> dict:
        return {"data": text, "headers": js}

    def body(value) -> dict:
        return {"json": value, "headers": AUTH}

    return {
        "not json": (raw("{not json"), 422),
        "empty body": (raw(""), 422),
        "a bare string": (body("hello"), 422),
        "null": (raw("null"), 422),
        "empty list": (body([]), 422),
        "list of lists": (body([[1, 2]]), 422),
        "missing field": (body(rest), 422),
        "extra field": (body({**good, "bogus": 1.0}), 422),
        "wrong type": (body({**good, field: "big"}), 422),
        "bool for number": (body({**good, field: True}), 422),
        "nested object": (body({**good, field: {"v": 1}}), 422),
        "NaN": (raw(json.dumps({**good, field: float("nan")})), 422),
        "Infinity": (raw(json.dumps({**good, field: float("inf")})), 422),
        "huge number": (raw(f'{{"{field}": 1e999, ' + json.dumps(rest)[1:]), 422),
        "huge body": (raw("[" + "1," * limit + "1]"), 413),
        "wrong content type": (
            {"data": json.dumps(good), "headers": {**AUTH, "Content-Type": "text/plain"}},
            415,
        ),
        "no token": ({"json": good, "headers": {}}, 401),
        "wrong token": ({"json": good, "headers": {"Authorization": "Bearer nope"}}, 401),
    }


def test_a_corpus_of_bad_requests_gets_4xx_and_the_server_keeps_answering(served):
    cfg, url, _, rows, _ = served
    good = rows[0]
    for name, (kwargs, status) in bad_requests(good, cfg.serve.max_request_bytes).items():
        r = requests.post(f"{url}/predict", timeout=30, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert "Traceback" not in r.text and 'File "' not in r.text, name
        named = ("missing field", "wrong type", "bool for number", "NaN", "huge number")
        if name in named:
            assert next(iter(good)) in {d["field"] for d in r.json()["detail"]}, (name, r.text)
        assert post(url, good).status_code == 200, f"server broken after {name}"
    assert requests.get(f"{url}/metadata", timeout=10).status_code == 401


def test_unknown_categories_reject_is_a_422_naming_the_column_and_bucket_answers(served, tmp_path):
    _, url, _, _, _ = served
    storage = Storage(str(tmp_path / "store"))
    ref = register_tiny_model(storage, tmp_path / "checkpoint")
    seen, unseen = {"x": 1.0, "color": "red"}, {"x": 1.0, "color": "mauve"}
    args = {"model": ref, "storage_root": storage.uri()}
    with (
        extra_app(url, "strict", {**args, "unknown_categories": "reject"}) as strict,
        extra_app(url, "lenient", args) as lenient,  # the default: bucket
    ):
        assert post(strict, seen).status_code == 200
        r = post(strict, unseen)
        assert r.status_code == 422, r.text[:300]
        first = r.json()["detail"][0]
        assert first["field"] == "color" and "'blue' or 'red'" in first["msg"], r.text[:300]
        r = post(strict, [seen, unseen])  # in a list: the record is named too
        assert r.status_code == 422 and "1.color" in {d["field"] for d in r.json()["detail"]}

        answers = post(lenient, [seen, unseen, {"x": 1.0, "color": "teal"}])
        assert answers.status_code == 200, answers.text[:300]
        red, mauve, teal = answers.json()["predictions"]
        assert mauve == teal  # both unseen: the same unknown bucket
        assert {red["label"], mauve["label"]} <= {"no", "yes"}


def test_property_based_requests_from_the_openapi_schema_find_no_5xx(served, tmp_path):
    _, url, _, _, _ = served
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [
            str(st),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "20",
            "--seed",
            "1",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "--request-timeout",
            "30",
            "--max-time",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Tested: 4" in result.stdout and "mismatch" not in result.stdout, result.stdout[-3000:]


class Load:
    """Requests in a loop from a few threads, every answer counted, until stopped."""

    def __init__(self, url: str, row: dict, threads: int = 4):
        self.url, self.row = url, row
        self.statuses: Counter = Counter()
        self.versions: list[str] = []
        self.answers: list[tuple[str, float]] = []  # (version, probability) of each 200
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = post(self.url, self.row)
                self.statuses[r.status_code] += 1
                if r.status_code == 200:
                    self.versions.append(r.json()["model_version"])
                    self.answers.append(
                        (self.versions[-1], r.json()["predictions"][0]["probability"])
                    )
                else:
                    self.errors.append(r.text[:200])
            except requests.RequestException as e:
                self.statuses["connection"] += 1
                self.errors.append(repr(e)[:200])
            time.sleep(0.01)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def wait_for(condition, timeout: float = 60, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out after {timeout} s {what}".strip()
        time.sleep(0.1)


def test_moving_the_alias_switches_running_replicas_without_failing_a_request(served):
    """Two versions, an MLP and then gradient-boosted trees: every answer is exactly the old
    model's or the new one's, labelled with the version that computed it."""
    cfg, url, storage, rows, (v1, v2) = served
    offline = {
        v.ref: Predictor.from_storage(storage, v.path).predict_records(rows[:1])[0]["probability"]
        for v in (v1, v2)
    }
    assert abs(offline["bc@1"] - offline["bc@2"]) > 1e-4  # the test can tell them apart
    with Load(url, rows[0]) as load:
        wait_for(lambda: len(load.versions) > 20)
        # what `dcml models promote --force` does (the gate is not this test's subject)
        registry.set_alias(storage, "bc", "production", 2, force=True)
        wait_for(lambda: load.versions[-8:] == ["bc@2"] * 8)
        n = len(load.versions)
        wait_for(lambda: len(load.versions) > n + 20)
    assert set(load.statuses) == {200}, (load.statuses, load.errors[:3])
    assert load.versions[0] == "bc@1" and load.versions[-1] == "bc@2"
    for version, probability in load.answers:
        assert abs(probability - offline[version]) < 1e-6, (version, probability, offline)
    # both replicas switched: every answer after the first bc@2 one... settles on bc@2
    assert "bc@1" not in load.versions[-20:]
    assert metadata(url)["version"] == 2


def metadata(url: str) -> dict:
    return requests.get(f"{url}/metadata", headers=AUTH, timeout=10).json()


def test_a_killed_replica_comes_back_with_the_served_schema_and_only_its_requests_fail(served):
    """bc@3 takes other inputs (a value training imputed is required): every replica refuses
    the alias's move to it and keeps bc@2, and so does the replica that replaces a killed one,
    whose deployment started on bc@1. Only requests in flight when it died fail (at most one
    per client thread)."""
    import copy

    import ray
    from ray.util.state import list_actors

    cfg, url, storage, rows, (_, v2) = served
    meta = copy.deepcopy({k: v for k, v in v2.meta.items() if k != "files"})
    meta["preprocessor"]["fill"][meta["preprocessor"]["numeric"][0]] = None
    v3 = registry.register(storage, "bc", v2.path, meta)
    registry.set_alias(storage, "bc", "production", v3.version, force=True)

    def states() -> set:  # (version served, version refused) of the replicas that answer
        return {(m["version"], m["refused"]) for m in (metadata(url) for _ in range(6))}

    deadline = time.time() + 60
    while (seen := states()) != {(2, "bc@3")}:
        assert time.time() < deadline, f"replicas' (version, refused): {seen}"
        time.sleep(0.1)
    ours = f"ServeReplica:{cfg.serve.app_name}:ModelServer"  # not other tests' (draining) apps

    def replicas() -> list:
        # this session's Ray: without an address the state API picks the newest Ray on the machine
        here = ray.get_runtime_context().gcs_address
        found = list_actors(address=here, filters=[("state", "=", "ALIVE")], limit=1000)
        return [a for a in found if a.class_name == ours]

    before = replicas()
    assert len(before) == 2
    with Load(url, rows[0]) as load:
        wait_for(lambda: sum(load.statuses.values()) > 20)
        ray.kill(ray.get_actor(before[0].name, namespace="serve"), no_restart=True)
        # Serve's controller notices and starts a new replica in its place
        wait_for(
            lambda: (
                len(replicas()) == 2 and before[0].actor_id not in {a.actor_id for a in replicas()}
            ),
            timeout=120,
        )
        n = load.statuses[200]
        wait_for(lambda: load.statuses[200] > n + 40)
    total = sum(load.statuses.values())
    failed = total - load.statuses[200]
    print(f"replica killed under load: {failed} of {total} requests failed ({dict(load.statuses)})")
    assert failed <= len(load._threads), load.errors[:5]
    assert set(load.versions) == {"bc@2"}, Counter(load.versions)  # one schema, one model
    assert states() == {(2, "bc@3")}


def running_replicas(app: str) -> int:
    deployment = serve.status().applications[app].deployments["ModelServer"]
    return deployment.replica_states.get("RUNNING", 0)


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(served):
    """serve.autoscaling from min 1 to max 2 replicas, aiming at 2 requests in flight each (each
    request waits batch_wait_s in its replica): 6 requests in flight start a second replica; one
    at a time, one replica is stopped again; no request fails meanwhile."""
    _, url, storage, rows, _ = served
    auto = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2}
    args = serve_args(make_config(Path(storage.root), serve={"autoscaling": auto}), "bc@1")
    # Ray's defaults wait 30 s to scale up and 600 s to scale down, on 10 s metric pushes
    args["autoscaling"] |= {
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 2,
    }
    args |= {"num_cpus": 0.1, "batch_wait_s": 0.2}
    with extra_app(url, "auto", args) as app:
        assert running_replicas("auto") == 1
        start = time.time()
        with Load(app, rows[0], threads=6) as heavy:
            wait_for(lambda: running_replicas("auto") == 2, 90, "for a second replica")
            up = time.time() - start
            n = heavy.statuses[200]
            wait_for(lambda: heavy.statuses[200] > n + 30)
        assert set(heavy.statuses) == {200}, (heavy.statuses, heavy.errors[:3])
        start = time.time()
        with Load(app, rows[0], threads=1) as light:  # at most 1 request in flight: 1 replica
            wait_for(lambda: running_replicas("auto") == 1, 30, "for a replica to stop")
            down = time.time() - start
            n = light.statuses[200]
            wait_for(lambda: light.statuses[200] > n + 10)
        assert set(light.statuses) == {200}, (light.statuses, light.errors[:3])
        print(f"autoscaling: 2 replicas after {up:.1f} s of load, 1 after {down:.1f} s of less")


def test_the_serve_config_file_deploys_and_user_config_switches_the_model(served):
    """serve_apps/config.yaml is what Ray's `serve run`/`serve deploy` take; its app, deployed
    beside the first, answers; a `user_config: {model: REF}` switches it to another version."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from dcml.serving import ModelServer

    from .conftest import REPO

    _, url, storage, rows, (v1, _) = served
    # another model, with bc@1's weights and schema: its version number is bc's current one
    registry.register(storage, "bcx", v1.path, v1.meta)
    raw = yaml.safe_load((REPO / "serve_apps" / "config.yaml").read_text())
    app = ServeDeploySchema.model_validate(raw).applications[0]
    assert raw["http_options"]["host"] == "127.0.0.1"
    module, _, attr = app.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    args = {**app.args, "model": "bc@1", "storage_root": storage.uri(), "auth_token": TOKEN}
    args["reload_s"] = 0
    serve.run(builder(args), name="fromfile", route_prefix="/fromfile")
    try:
        assert post(f"{url}/fromfile", rows[0]).json()["model_version"] == "bc@1"
        for ref in ("bcx@1", "bc@2"):  # the name counts, not only the version number
            switched = ModelServer.options(
                user_config={"model": ref}, ray_actor_options={"num_cpus": args["num_cpus"]}
            ).bind(args)
            serve.run(switched, name="fromfile", route_prefix="/fromfile")
            assert post(f"{url}/fromfile", rows[0]).json()["model_version"] == ref
    finally:
        serve.delete("fromfile", _blocking=False)
