"""The HTTP face of a model version: a FastAPI app, hosted on Ray Serve.

`build_http_app` is plain FastAPI around a model source (testable without Ray); `ModelServer` hosts
it in Serve replicas, each loading the model version itself, so only a reference travels. Replicas
batch requests (`@serve.batch`, up to `max_batch_size` records) and follow their alias: when
`dcml models promote` moves it, each replica loads the new version and swaps it in between batches,
so no request fails. Every answer carries an `x-dcml-batch-size` header: the records predicted in
the call that answered it (its own and those of the requests batched with it).
"""

import hmac
import logging
import threading
import time
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from ray import serve

from dcml.data.transforms import Preprocessor
from dcml.predictor import Predictor

log = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "x-dcml-batch-size"


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


def record_model(pre: Preprocessor, unknown_categories: str = "bucket") -> type[BaseModel]:
    """A request record: every input column by name, nothing else. Numbers are finite; text is a
    category (with unknown_categories="reject", one seen in training). null is a missing value,
    imputed as in training where training imputed that column (a column whose missing rows were
    dropped in training must be sent)."""
    finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    text = Annotated[str, Field(strict=True, max_length=1024)]
    fields: dict[str, Any] = {}
    for i, name in enumerate(pre.numeric):
        kind = finite if pre.fill[name] is None else finite | None
        fields[f"f{i}"] = (kind, Field(alias=name))
    for i, name in enumerate(pre.categorical):
        known = pre.categories[name]
        kind = Literal[tuple(known)] if unknown_categories == "reject" and known else text
        fields[f"c{i}"] = (kind | None, Field(alias=name))
    return create_model("Record", __config__=ConfigDict(extra="forbid"), **fields)


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


class BodyLimit:
    """ASGI middleware: bodies over `limit` bytes get 413 before they are read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope, send):
        detail = f"request body over {self.limit} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, None, send)


class _TooLarge(Exception):
    pass


def _field_name(loc: tuple) -> str:
    """('body', 'Record', 'mean area') or ('body', 'list[Record]', 3, 'x') -> the field's name."""
    parts = [p for p in loc if p not in ("body", "Record", "list[Record]")]
    return ".".join(str(p) for p in parts) or "body"


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
    Record = record_model(pre, unknown_categories)
    Records = Annotated[list[Record], Field(min_length=1)]  # type: ignore[valid-type]
    app = FastAPI(title="dcml model server", version=str(source.predictor.meta.get("version")))
    _, _, alias = model_ref.partition("@")

    # Everything on the request path is async: FastAPI runs a sync endpoint or dependency in a
    # worker thread, and that hop was ~8% of a replica's CPU per request.
    async def check_token(request: Request) -> None:
        if auth_token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {auth_token}".encode()):
            raise HTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the field; never echo the input back (it may be huge, or NaN that JSON can't hold).
        detail = [
            {"field": _field_name(e["loc"]), "loc": list(e["loc"]), "msg": e["msg"]}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

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
            "schema": Record.model_json_schema(by_alias=True),
            "classes": predictor.classes,
            "metrics": m.get("metrics", {}),
            "lineage": m.get("lineage", {}),
        }

    @app.post("/predict", dependencies=[Depends(check_token)])
    async def predict(
        body: Annotated[Record | Records, Body()],  # type: ignore[valid-type]
        response: Response,
    ) -> dict:
        records = body if isinstance(body, list) else [body]
        rows = [r.model_dump(by_alias=True) for r in records]
        answers, batch_size = await source.predict(rows)
        response.headers[BATCH_SIZE_HEADER] = str(batch_size)
        return {"predictions": answers, "model_version": answers[0]["model_version"]}

    app.add_middleware(BodyLimit, limit=max_request_bytes)
    return app


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
            return await self.predict_batch(rows)
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
