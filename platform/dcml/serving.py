"""The model's HTTP app hosted on Ray Serve.

`ModelServer` hosts `dcml.http_app` in Serve replicas, each loading the model version itself, so
only a reference travels. Replicas batch requests (`@serve.batch`, up to `max_batch_size` records)
and follow their alias: when `dcml models promote` moves it, each replica loads the new version and
swaps it in between batches, so no request fails.
"""

import asyncio
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import Field
from ray import serve

from dcml.data.transforms import Preprocessor
from dcml.http_app import bearer_token, build_http_app, same_schema, token_digest
from dcml.prediction_log import PredictionLog
from dcml.predictor import Predictor
from dcml.registry import ModelVersion, pointed_at, resolve_model
from dcml.serve_config import ServeConfig

log = logging.getLogger(__name__)


class ServeArgs(ServeConfig):
    """Arguments of the Serve application (what `serve_apps/config.yaml` passes): the `serve`
    section of a pipeline config, plus the model and the storage that holds it."""

    model: str = Field(description="Model reference: NAME@ALIAS, NAME@VERSION or NAME.")
    storage_root: str = Field("./dcml-store", description="Storage root holding models/.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the storage root."
    )
    schema_of: str | None = Field(
        None,
        pattern=r"^[^@]+@[0-9]+$",
        description="NAME@VERSION whose inputs the deployment keeps (default: the version `model` "
        "resolves to when the application is built). Every replica, a new one too, refuses a "
        "version with other inputs and serves the newest one `model` pointed at with these.",
    )
    auth_token_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 (hex) of `Bearer TOKEN`: what replicas get for `auth_token`.",
    )


def inputs_of(mv: ModelVersion) -> Preprocessor:
    return Preprocessor.from_json(mv.meta["preprocessor"])


def _signature_computed(fn: Callable) -> Callable:
    """`fn` with its signature computed once: `@serve.batch` asks `inspect.signature` for it on
    every request (8% of a replica's CPU at concurrency 32 here), which then is a lookup."""
    fn.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return fn


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()
class ModelServer:
    """A replica loads the model version itself (only the reference travels), batches requests,
    and follows its alias every `reload_s` seconds."""

    def __init__(self, args: dict[str, Any]):
        from dcml.storage import Storage

        self.args = ServeArgs.model_validate(args)
        self.storage = Storage(self.args.storage_root, self.args.storage_options)
        self.device = "cuda" if self.args.use_gpu else "cpu"
        self.ref = self.args.model
        # the version whose inputs this replica keeps (NAME@N; app_builder pins it for all)
        self.pinned = resolve_model(self.storage, self.args.schema_of or self.ref)
        self.inputs = inputs_of(self.pinned)
        self.lock = threading.Lock()  # one switch at a time: the follower's or reconfigure's
        self.predictor: Predictor | None = None
        self.recent: dict[str, Predictor] = {}  # by version: the served one and the one before
        self.target: tuple[str, int] | None = None  # what `ref` resolved to at the last check
        self.refused: str | None = None  # the version `ref` points at, when its inputs differ
        self.switch()
        self.in_flight = 0  # requests in `predict`
        self.metrics = None
        if self.args.metrics:
            from dcml.service_metrics import ServiceMetrics

            self.metrics = ServiceMetrics()
        a = self.args
        on_drop = self.metrics.dropped if self.metrics else None
        self.log = PredictionLog(
            self.storage,
            a.log_fraction,
            a.log_flush_rows,
            a.log_flush_s,
            a.log_buffer_rows,
            on_drop,
        )
        self.predict_batch.set_max_batch_size(self.args.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_s)
        if self.args.reload_s > 0:
            threading.Thread(target=self._follow, name="dcml-follow-alias", daemon=True).start()

    def switch(self) -> bool:
        """Load the version the reference points at now, if it is another; True if switched.

        A version whose inputs differ from the deployment's is refused (one endpoint, one
        schema); the replica then serves the newest version the reference pointed at with the
        deployment's inputs (else the pinned version), which every replica, a new one too,
        finds the same."""
        with self.lock:
            return self._switch()

    def _switch(self) -> bool:
        ref = self.ref  # once: reconfigure may change it meanwhile
        mv = resolve_model(self.storage, ref)
        target = (mv.name, mv.version)
        if target == self.target:
            return False
        refused = None if same_schema(inputs_of(mv), self.inputs) else mv.ref
        if refused:
            log.error("not serving %s for %s: its inputs differ from the served ones", mv.ref, ref)
            mv = next(
                (
                    c
                    for c in pointed_at(self.storage, ref)
                    if same_schema(inputs_of(c), self.inputs)
                ),
                self.pinned,
            )
        switched = self.predictor is None or (mv.name, mv.version) != (
            self.predictor.meta.get("name"),
            self.predictor.meta.get("version"),
        )
        if switched:  # one assignment: a batch uses the old or the new, whole
            old = self.predictor
            self.predictor = Predictor.from_storage(self.storage, mv.path, self.device)
            # the previous version too: its last answers are logged after the switch
            self.recent = {p.version: p for p in (old, self.predictor) if p is not None}
            log.info("now serving %s for %s", mv.ref, ref)
        self.target, self.refused = target, refused  # after loading: a failed load is retried
        return switched

    def _follow(self) -> None:
        while True:
            time.sleep(self.args.reload_s)
            try:
                self.switch()
            except Exception:  # storage briefly unreachable: keep serving, try again later
                log.exception("could not check %s", self.ref)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config: {model: REF}` (Serve config or `serve.run`) switches the reference."""
        if user_config.get("model"):
            self.ref = user_config["model"]
            self.switch()

    @serve.batch(
        max_batch_size=256, batch_wait_timeout_s=0.0, batch_size_fn=lambda b: sum(map(len, b))
    )
    @_signature_computed
    async def predict_batch(
        self, requests: list[list[dict[str, Any]]]
    ) -> list[tuple[list[dict], int]]:
        """Requests' records predicted together in one vectorised call, then split back; each
        request also gets the batch's record count."""
        answers = self.score(self.predictor, [row for rows in requests for row in rows])
        out, start = [], 0
        for rows in requests:
            out.append((answers[start : start + len(rows)], len(answers)))
            start += len(rows)
        return out

    async def predict(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Answers for a request's rows and the records predicted in the call that answered them.

        Requests are batched by record count, never over `max_batch_size` records. A request of
        more records than that (Serve's batcher would fail it: one item over the batch size) is
        not batched with others: it is predicted alone, `max_batch_size` records per call, all by
        the same model version."""
        limit = self.args.max_batch_size
        if len(rows) <= limit:
            self.in_flight += 1
            try:
                if self.in_flight == 1:
                    await asyncio.sleep(0)  # requests that came in with this one get here too
                if self.in_flight > 1:
                    return await self.predict_batch(rows)
                # Alone: the batcher would only add its queue, tasks and metrics (~0.1 ms).
                return self.score(self.predictor, rows), len(rows)
            finally:
                self.in_flight -= 1
        predictor = self.predictor
        answers: list[dict[str, Any]] = []
        for start in range(0, len(rows), limit):
            answers += self.score(predictor, rows[start : start + limit])
        return answers, limit

    def score(self, predictor: Predictor, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One model call, counted in the metrics and sampled into the prediction log."""
        seen: dict[str, Any] | None = {} if self.metrics else None
        answers = predictor.predict_records(rows, seen)
        if self.metrics:
            self.metrics.scored(predictor, len(rows), seen)
        return answers

    def answered(self, rows: list[dict[str, Any]], answers: list[dict[str, Any]]) -> None:
        """A /predict request answered 200: its records go to the prediction log (a 422'd
        request's rows, though scored, were never answered)."""
        version = answers[0]["model_version"]
        self.log.add(self.recent.get(version, self.predictor), rows, answers)

    def observe(self, status: int, seconds: float) -> None:
        """A /predict request's answer (its status and time), for the metrics."""
        if self.metrics:
            self.metrics.request(self.predictor, status, seconds)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: write what the log holds, and hand the
        last counts to Ray."""
        if getattr(self, "log", None) is not None:
            self.log.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.flush()

    def __serve_build_asgi_app__(self) -> FastAPI:
        a = self.args
        return build_http_app(
            self,
            a.max_request_bytes,
            bearer_token(a),
            self.ref,
            a.unknown_categories,
            observe=self.observe if self.metrics else None,
            answered=self.answered if a.log_fraction else None,
        )


def app_builder(args: dict[str, Any]):
    """Serve application builder (`serve run dcml.serving:app_builder model=...`)."""
    parsed = ServeArgs.model_validate(args)
    if parsed.schema_of is None:  # pinned now: a replica started later keeps these inputs
        from dcml.storage import Storage

        storage = Storage(parsed.storage_root, parsed.storage_options)
        parsed.schema_of = resolve_model(storage, parsed.model).ref
    if token := parsed.auth_token:  # only its digest travels (Serve shows a deployment's args)
        parsed.auth_token = None
        parsed.auth_token_sha256 = token_digest(token)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": parsed.num_cpus, "num_gpus": 1 if parsed.use_gpu else 0},
        # room for a full batch of one-record requests in flight
        "max_ongoing_requests": max(64, parsed.max_batch_size),
        "graceful_shutdown_timeout_s": parsed.drain_s,
        "graceful_shutdown_wait_loop_s": 0.2,  # how often a stopping replica looks (2 s)
    }
    if parsed.autoscaling:
        options["autoscaling_config"] = parsed.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = parsed.num_replicas
    return ModelServer.options(**options).bind(parsed.model_dump())


def serve_args(cfg, model_ref: str) -> dict[str, Any]:
    """The application's arguments from a pipeline config."""
    from dcml.storage import Storage

    args = cfg.serve.model_dump()
    if token := args.pop("auth_token"):  # only its digest travels (Serve shows the arguments)
        args["auth_token_sha256"] = token_digest(token)
    return {
        **args,
        "model": model_ref,
        "storage_root": Storage.from_config(cfg).uri(),
        "storage_options": cfg.storage.storage_options,
    }


def deploy(cfg, model_ref: str) -> str:
    """Start Serve on the configured host/port, deploy the model, return its base URL."""
    from dcml.console import quiet
    from dcml.registry import require_model, resolve_model
    from dcml.storage import Storage

    storage = Storage.from_config(cfg)
    require_model(storage, resolve_model(storage, model_ref))  # refused here, not in a replica
    level = "WARNING" if quiet(cfg.cluster.quiet) else "INFO"  # Serve's actors: their log files
    # this process: not even Serve's warnings (a failed deployment raises, and dcml says so)
    logging.getLogger("ray.serve").setLevel("ERROR" if level == "WARNING" else level)
    serve.start(
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        logging_config={"log_level": level},
    )
    serve.run(
        app_builder(serve_args(cfg, model_ref)),
        name=cfg.serve.app_name,
        route_prefix=cfg.serve.route_prefix,
        logging_config={"log_level": level},
    )
    prefix = cfg.serve.route_prefix.rstrip("/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}"


def metrics_url() -> str | None:
    """Where Ray exports this node's metrics, the served model's too, in Prometheus format
    (None: Ray's metrics collection is off)."""
    import ray

    if os.environ.get("RAY_enable_metrics_collection", "1").lower() in ("0", "false"):
        return None
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == here and node.get("MetricsExportPort", 0) > 0:
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None
