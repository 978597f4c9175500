"""The HTTP face of a model version: a FastAPI app, hosted on Ray Serve.

`build_http_app` is plain FastAPI around a `Predictor` (testable without Ray); `ModelServer` hosts
it in Serve replicas, each loading the model version itself, so only a reference travels.
"""

import hmac
import logging
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from ray import serve

from dcml.data.transforms import Preprocessor
from dcml.predictor import Predictor

log = logging.getLogger(__name__)


class ServeArgs(BaseModel):
    """Arguments of the Serve application (also what `serve_apps/config.yaml` passes)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Model reference: NAME@ALIAS, NAME@VERSION or NAME.")
    storage_root: str = Field("./dcml-store", description="Storage root holding models/.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    num_replicas: int = Field(1, ge=1)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    auth_token: str | None = None


def record_model(pre: Preprocessor) -> type[BaseModel]:
    """A request record: every input column by name, nothing else. Numbers are finite; text is a
    category. null is a missing value, imputed as in training where training imputed that column
    (a column whose missing rows were dropped in training must be sent)."""
    finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    text = Annotated[str, Field(strict=True, max_length=1024)]
    fields: dict[str, Any] = {}
    for i, name in enumerate(pre.numeric):
        kind = finite if pre.fill[name] is None else finite | None
        fields[f"f{i}"] = (kind, Field(alias=name))
    for i, name in enumerate(pre.categorical):
        fields[f"c{i}"] = (text | None, Field(alias=name))
    return create_model("Record", __config__=ConfigDict(extra="forbid"), **fields)


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
    predictor: Predictor, max_request_bytes: int, auth_token: str | None, model_ref: str = ""
) -> FastAPI:
    pre = predictor.preprocessor
    Record = record_model(pre)
    app = FastAPI(title="dcml model server", version=str(predictor.meta.get("version")))

    def check_token(request: Request) -> None:
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
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready", "model_version": predictor.version}

    @app.get("/metadata", dependencies=[Depends(check_token)])
    def metadata() -> dict:
        m = predictor.meta
        return {
            "model": m.get("name"),
            "version": m.get("version"),
            "ref": model_ref,
            "task": m.get("task", "binary"),
            "inputs": {"numeric": pre.numeric, "categorical": pre.categorical},
            "classes": predictor.classes,
            "metrics": m.get("metrics", {}),
            "lineage": m.get("lineage", {}),
        }

    @app.post("/predict", dependencies=[Depends(check_token)])
    def predict(body: Annotated[Record | list[Record], Body()]) -> dict:  # type: ignore[valid-type]
        records = body if isinstance(body, list) else [body]
        if not records:
            raise HTTPException(422, "send one record or a non-empty list of records")
        rows = [r.model_dump(by_alias=True) for r in records]
        return {"predictions": predictor.predict_records(rows), "model_version": predictor.version}

    app.add_middleware(BodyLimit, limit=max_request_bytes)
    return app


# Half a CPU per replica so that a small node still has CPUs for Ray Data and Train beside it.
@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class ModelServer:
    """A replica loads the model version itself: only the reference travels."""

    def __init__(self, args: dict[str, Any]):
        from dcml.registry import resolve_model
        from dcml.storage import Storage

        self.args = ServeArgs.model_validate(args)
        storage = Storage(self.args.storage_root, self.args.storage_options)
        self.predictor = Predictor.from_storage(
            storage, resolve_model(storage, self.args.model).path
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        a = self.args
        return build_http_app(self.predictor, a.max_request_bytes, a.auth_token, a.model)


def app_builder(args: dict[str, Any]):
    """Serve application builder (`serve run dcml.serving:app_builder model=...`)."""
    parsed = ServeArgs.model_validate(args)
    return ModelServer.options(num_replicas=parsed.num_replicas).bind(parsed.model_dump())


def deploy(cfg, model_ref: str) -> str:
    """Start Serve on the configured host/port, deploy the model, return its base URL."""
    from dcml.storage import Storage

    args = {
        "model": model_ref,
        "storage_root": Storage.from_config(cfg).uri(),
        "storage_options": cfg.storage.storage_options,
        "num_replicas": cfg.serve.num_replicas,
        "max_request_bytes": cfg.serve.max_request_bytes,
        "auth_token": cfg.serve.auth_token,
    }
    level = "WARNING" if cfg.cluster.quiet else "INFO"
    logging.getLogger("ray.serve").setLevel(level)
    serve.start(
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
        logging_config={"log_level": level},
    )
    serve.run(
        app_builder(args),
        name=cfg.serve.app_name,
        route_prefix=cfg.serve.route_prefix,
        logging_config={"log_level": level},
    )
    prefix = cfg.serve.route_prefix.rstrip("/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}{prefix}"
