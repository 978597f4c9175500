"""The HTTP face of a model version: a FastAPI app, hosted on Ray Serve.

`build_http_app` is plain FastAPI around a model source (testable without Ray); `ModelServer` hosts
it in Serve replicas, each loading the model version itself, so only a reference travels. Replicas
batch requests (`@serve.batch`, up to `max_batch_size` records) and follow their alias: when
`dcml models promote` moves it, each replica loads the new version and swaps it in between batches,
so no request fails. Every answer carries an `x-dcml-batch-size` header: the records predicted in
the call that answered it (its own and those of the requests batched with it).
"""

import asyncio
import hmac
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from ray import serve
from starlette.routing import Route
from typing_extensions import TypedDict

from dcml.data.transforms import Preprocessor
from dcml.predictor import Predictor

log = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "x-dcml-batch-size"
UNAUTHORIZED = "missing or wrong bearer token"


class ServeArgs(BaseModel):
    """Arguments of the Serve application (also what `serve_apps/config.yaml` passes)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Model reference: NAME@ALIAS, NAME@VERSION or NAME.")
    storage_root: str = Field("./dcml-store", description="Storage root holding models/.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    num_replicas: int = Field(1, ge=1)
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = Field(0.5, gt=0)
    use_gpu: bool = False
    max_batch_size: int = Field(256, ge=1)
    batch_wait_s: float = Field(0.0, ge=0)
    reload_s: float = Field(5.0, ge=0)
    unknown_categories: Literal["bucket", "reject"] = "bucket"
    max_request_bytes: int = Field(1_000_000, ge=1024)
    auth_token: str | None = None


def record_type(pre: Preprocessor, unknown_categories: str = "bucket") -> type:
    """A request record (a TypedDict): every input column by name, nothing else. Numbers are
    finite; text is a category (with unknown_categories="reject", one seen in training). null is a
    missing value, imputed as in training where training imputed that column (a column whose
    missing rows were dropped in training must be sent)."""
    finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    text = Annotated[str, Field(strict=True, max_length=1024)]
    fields: dict[str, Any] = {}
    for name in pre.numeric:
        fields[name] = finite if pre.fill[name] is None else finite | None
    for name in pre.categorical:
        known = pre.categories[name]
        kind = Literal[tuple(known)] if unknown_categories == "reject" and known else text
        fields[name] = kind | None
    record = TypedDict("Record", fields)  # type: ignore[misc]
    record.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return record


def same_schema(a: Preprocessor, b: Preprocessor) -> bool:
    """Whether requests valid for one model version are valid for the other."""
    return (a.numeric, a.categorical, a.categories) == (
        b.numeric,
        b.categorical,
        b.categories,
    ) and {c: a.fill[c] is None for c in a.numeric} == {c: b.fill[c] is None for c in b.numeric}


class LocalModel:
    """A fixed predictor as a model source (no Ray, no batching)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    async def predict(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        return self.predictor.predict_records(rows), len(rows)


class PredictEndpoint:
    """`POST /predict` as a bare ASGI app: one record or a non-empty list, validated by
    pydantic-core straight from the request's bytes, answered with pre-encoded JSON."""

    def __init__(self, source: Any, body_type: TypeAdapter, limit: int, token: str | None):
        self.source, self.body_type, self.limit = source, body_type, limit
        self.expected = None if token is None else f"Bearer {token}".encode()
        self.unauthorized = _json(401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])
        self.too_large = _json(413, {"detail": f"request body over {limit} bytes"})

    async def __call__(self, scope, receive, send) -> None:
        if scope["method"] != "POST":
            status, body, headers = _json(405, {"detail": "use POST"}, [(b"allow", b"POST")])
        else:
            try:
                status, body, headers = await self.answer(dict(scope["headers"]), receive)
            except _Disconnected:
                return
            except Exception:
                log.exception("unhandled error on /predict")  # the trace stays in the logs
                status, body, headers = _json(500, {"detail": "internal error"})
        length = str(len(body)).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", length), *headers]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    def authorized(self, authorization: bytes) -> bool:
        """Whether an Authorization header value carries the token (any, when none is set)."""
        return self.expected is None or hmac.compare_digest(authorization, self.expected)

    async def answer(self, headers: dict[bytes, bytes], receive) -> tuple[int, bytes, list]:
        if not self.authorized(headers.get(b"authorization", b"")):
            return self.unauthorized
        kind = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        if kind != b"application/json" and not kind.endswith(b"+json"):
            return _json(415, {"detail": "the body must be application/json"})
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return self.too_large
        body = await _read_body(receive, self.limit)
        if body is None:
            return self.too_large
        try:
            parsed = self.body_type.validate_json(body)
        except ValidationError as exc:
            return _json(422, {"detail": _validation_errors(body, exc)})
        rows = parsed if isinstance(parsed, list) else [parsed]
        answers, batch_size = await self.source.predict(rows)
        content = {"predictions": answers, "model_version": answers[0]["model_version"]}
        return _json(200, content, [(BATCH_SIZE_HEADER.encode(), str(batch_size).encode())])


class ModelApp(FastAPI):
    """FastAPI, with `POST /predict` answered before Starlette's middleware and routing.

    Those layers (error and exception middleware, routing, the Request and Response objects,
    dependency solving) cost a replica ~0.25 ms of CPU per request, as much as a one-record
    prediction. /predict is documented in the OpenAPI schema like any route; every other path
    goes through FastAPI."""

    def __init__(self, predict: PredictEndpoint, **kwargs: Any):
        super().__init__(**kwargs)
        self.predict = predict
        # First among the routes: Serve looks up every request's route in order (a metrics tag),
        # twice when nothing matches.
        self.router.routes.insert(0, Route("/predict", predict, include_in_schema=False))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _route_path(scope) == "/predict":
            return await self.predict(scope, receive, send)
        await super().__call__(scope, receive, send)


class _Disconnected(Exception):
    pass


def _route_path(scope) -> str:
    """The path below the app's root path (Serve mounts an app at its route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def _json(status: int, content: Any, headers: list | None = None) -> tuple[int, bytes, list]:
    return status, json.dumps(content, separators=(",", ":")).encode(), headers or []


async def _read_body(receive, limit: int) -> bytes | None:
    """The request body, or None once it is over `limit` bytes (not read further)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _field_name(loc: tuple) -> str:
    """('Record', 'mean area') or ('list[Record]', 3, 'x') -> the field's name."""
    return ".".join(str(p) for p in loc[1:]) or "body"


def _validation_errors(body: bytes, exc: ValidationError) -> list[dict[str, Any]]:
    """The errors of the request's own shape: a list's, or a single record's (the other branch
    of `Record | list[Record]` only adds noise), each naming its field. Never echoes the input
    (it may be huge, or NaN that JSON can't hold)."""
    errors = exc.errors(include_url=False, include_input=False)
    branch = "list[Record]" if body.lstrip()[:1] == b"[" else "Record"
    mine = [e for e in errors if e["loc"][:1] == (branch,)] or errors
    return [{"field": _field_name(e["loc"]), "loc": list(e["loc"]), "msg": e["msg"]} for e in mine]


PREDICT_DOC = {
    "summary": "Predict",
    "operationId": "predict",
    "responses": {
        "200": {"description": "A prediction per record, in order, and the version answering."},
        "401": {"description": "Missing or wrong bearer token (when the server requires one)."},
        "413": {"description": "The body is over the server's limit."},
        "415": {"description": "The body is not application/json."},
        "422": {"description": "Invalid records: each error names its field."},
    },
}


def build_http_app(
    source: Any,
    max_request_bytes: int,
    auth_token: str | None,
    model_ref: str = "",
    unknown_categories: str = "bucket",
) -> FastAPI:
    """The app around a model source: a Predictor, or anything with a current `predictor` and an
    async `predict(rows) -> (answers, batch size)` (a Serve replica, which batches and may switch
    versions; the batch size is the records predicted in the call that answered these rows)."""
    if isinstance(source, Predictor):
        source = LocalModel(source)
    pre = source.predictor.preprocessor
    record = record_type(pre, unknown_categories)
    # One record or a non-empty list, validated straight from the request's bytes by
    # pydantic-core: FastAPI's own body handling (json.loads, a model per record, model_dump, the
    # response's encoder) cost a replica about as much CPU as the model itself.
    body_type = TypeAdapter(record | Annotated[list[record], Field(min_length=1)])
    body_schema = body_type.json_schema(ref_template="#/components/schemas/{model}")
    schemas = body_schema.pop("$defs")
    request_body = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    endpoint = PredictEndpoint(source, body_type, max_request_bytes, auth_token)
    app = ModelApp(
        endpoint,
        title="dcml model server",
        version=str(source.predictor.meta.get("version")),
    )
    _, _, alias = model_ref.partition("@")

    # Everything on the request path is async: FastAPI runs a sync endpoint or dependency in a
    # worker thread, and that hop was ~8% of a replica's CPU per request.
    async def check_token(request: Request) -> None:
        if not endpoint.authorized(request.headers.get("authorization", "").encode()):
            raise HTTPException(401, UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)  # the trace stays in the logs
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready", "model_version": source.predictor.version}

    @app.get("/metadata", dependencies=[Depends(check_token)])
    async def metadata() -> dict:
        predictor = source.predictor
        m = predictor.meta
        return {
            "model": m.get("name"),
            "version": m.get("version"),
            "ref": model_ref,
            "alias": alias if alias and not alias.isdigit() and alias != "latest" else None,
            "task": m.get("task", "binary"),
            "inputs": {"numeric": pre.numeric, "categorical": pre.categorical},
            "schema": schemas["Record"],
            "classes": predictor.classes,
            "metrics": m.get("metrics", {}),
            "lineage": m.get("lineage", {}),
        }

    openapi = app.openapi

    def openapi_with_predict() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        spec = openapi()
        spec.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
        operation = PREDICT_DOC | {"requestBody": request_body}
        if auth_token is not None:
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            operation["security"] = [{"bearer": []}]
        spec["paths"]["/predict"] = {"post": operation}
        return spec

    app.openapi = openapi_with_predict  # type: ignore[method-assign]
    return app


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
        self.predictor = self._load(self.ref)
        self.in_flight = 0  # requests in `predict`
        self.predict_batch.set_max_batch_size(self.args.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.args.batch_wait_s)
        if self.args.reload_s > 0:
            threading.Thread(target=self._follow, name="dcml-follow-alias", daemon=True).start()

    def _load(self, ref: str) -> Predictor:
        from dcml.registry import resolve_model

        return Predictor.from_storage(
            self.storage, resolve_model(self.storage, ref).path, self.device
        )

    def switch(self) -> bool:
        """Load the version the reference points at now, if it is another; True if switched."""
        from dcml.registry import resolve_model

        mv = resolve_model(self.storage, self.ref)
        if mv.version == self.predictor.meta.get("version"):
            return False
        new = Predictor.from_storage(self.storage, mv.path, self.device)
        if not same_schema(new.preprocessor, self.predictor.preprocessor):
            log.error("not switching to %s: its inputs differ from the served schema", mv.ref)
            return False
        self.predictor = new  # one assignment: a batch uses the old or the new, whole
        log.info("now serving %s for %s", mv.ref, self.ref)
        return True

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
        predictor = self.predictor
        answers = predictor.predict_records([row for rows in requests for row in rows])
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
                return self.predictor.predict_records(rows), len(rows)
            finally:
                self.in_flight -= 1
        predictor = self.predictor
        answers: list[dict[str, Any]] = []
        for start in range(0, len(rows), limit):
            answers += predictor.predict_records(rows[start : start + limit])
        return answers, limit

    def __serve_build_asgi_app__(self) -> FastAPI:
        a = self.args
        return build_http_app(
            self, a.max_request_bytes, a.auth_token, self.ref, a.unknown_categories
        )


def app_builder(args: dict[str, Any]):
    """Serve application builder (`serve run dcml.serving:app_builder model=...`)."""
    parsed = ServeArgs.model_validate(args)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": parsed.num_cpus, "num_gpus": 1 if parsed.use_gpu else 0},
        # room for a full batch of one-record requests in flight
        "max_ongoing_requests": max(64, parsed.max_batch_size),
    }
    if parsed.autoscaling:
        options["autoscaling_config"] = parsed.autoscaling
    else:
        options["num_replicas"] = parsed.num_replicas
    return ModelServer.options(**options).bind(parsed.model_dump())


def serve_args(cfg, model_ref: str) -> dict[str, Any]:
    """The application's arguments from a pipeline config."""
    from dcml.storage import Storage

    s = cfg.serve
    return {
        "model": model_ref,
        "storage_root": Storage.from_config(cfg).uri(),
        "storage_options": cfg.storage.storage_options,
        "num_replicas": s.num_replicas,
        "autoscaling": s.autoscaling.model_dump() if s.autoscaling else None,
        "num_cpus": s.num_cpus,
        "use_gpu": s.use_gpu,
        "max_batch_size": s.max_batch_size,
        "batch_wait_s": s.batch_wait_s,
        "reload_s": s.reload_s,
        "unknown_categories": s.unknown_categories,
        "max_request_bytes": s.max_request_bytes,
        "auth_token": s.auth_token,
    }


def deploy(cfg, model_ref: str) -> str:
    """Start Serve on the configured host/port, deploy the model, return its base URL."""
    from dcml.registry import require_model, resolve_model
    from dcml.storage import Storage

    storage = Storage.from_config(cfg)
    require_model(storage, resolve_model(storage, model_ref))  # refused here, not in a replica
    level = "WARNING" if cfg.cluster.quiet else "INFO"
    logging.getLogger("ray.serve").setLevel(level)
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
