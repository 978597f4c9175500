"""The HTTP face of a model version: a FastAPI app around a model source, with no Ray in it.

`build_http_app` serves any object with `predict(records)` (a `LocalModel` in one process, a Serve
replica in `dcml.serving`). `POST /predict` is a bare ASGI endpoint, answered before FastAPI's
middleware and routing, with the body validated by pydantic-core straight from its bytes (a
`TypedDict` record built from the preprocessor) and pre-encoded JSON answers. Every answer carries
an `x-dcml-batch-size` header: the records predicted in the call that answered it.
"""

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from starlette.routing import Route
from typing_extensions import NotRequired, TypedDict

from dcml.data.transforms import Preprocessor
from dcml.predictor import Predictor

log = logging.getLogger(__name__)

BATCH_SIZE_HEADER = "x-dcml-batch-size"
UNAUTHORIZED = "missing or wrong bearer token"


def record_type(pre: Preprocessor, unknown_categories: str = "bucket") -> type:
    """A request record (a TypedDict): every input column by name, nothing else. Numbers are
    finite; text is a category (with unknown_categories="reject", one seen in training). null is a
    missing value, imputed as in training where training imputed that column (a column whose
    missing rows were dropped in training must be sent). An optional `id` (text or an integer)
    is not a feature: the answer and the prediction log carry it, to join labels later."""
    finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
    text = Annotated[str, Field(strict=True, max_length=1024)]
    fields: dict[str, Any] = {}
    if "id" not in pre.inputs:
        text_id = Annotated[str, Field(strict=True, max_length=256)]
        fields["id"] = NotRequired[text_id | Annotated[int, Field(strict=True)] | None]
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


def token_digest(value: str) -> str:
    """What a server keeps of a fixed token (the SHA-256 of its `Authorization` header value):
    Serve's deployment arguments are shown in its dashboard and status, the token is not."""
    return hashlib.sha256(f"Bearer {value}".encode()).hexdigest()


class BearerToken:
    """The token requests must carry: fixed (or its digest), from an environment variable (read
    once), or from a file, re-read when it changes (checked at most every `recheck_s`), so that a
    token can be rotated without a restart. Its value is never logged or stored. A header is
    checked by comparing digests."""

    def __init__(
        self,
        value: str | None = None,
        env: str | None = None,
        file: str | None = None,
        recheck_s: float = 1.0,
        digest: str | None = None,
    ):
        if env is not None:
            value = os.environ.get(env)
            if not value:
                raise ValueError(f"serve.auth_token_env: ${env} is not set in this environment")
        self.file, self.recheck_s = file, recheck_s
        self._set(value)
        if digest:
            self.expected = bytes.fromhex(digest)
        self._checked, self._warned = 0.0, False
        if file is not None:
            self._reload()

    def _set(self, value: str | None) -> None:
        self.value = value  # the token itself, for a client of the app
        self.expected = None if value is None else bytes.fromhex(token_digest(value))

    @property
    def required(self) -> bool:
        return self.expected is not None

    def current(self) -> bytes | None:
        """The digest of `Bearer TOKEN` (None: no token required)."""
        if self.file is not None and time.monotonic() - self._checked >= self.recheck_s:
            try:
                self._reload()
                self._warned = False
            except (OSError, ValueError) as e:  # mid-rotation or briefly gone: keep the last one
                if not self._warned:
                    log.warning("serve.auth_token_file unreadable (%s); keeping the last token", e)
                self._warned = True
        return self.expected

    def _reload(self) -> None:
        self._checked = time.monotonic()
        with open(self.file) as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"serve.auth_token_file: {self.file} is empty")
        self._set(token)


def bearer_token(serve_cfg: Any) -> BearerToken:
    """The token a `serve` section (or ServeArgs) asks for."""
    s = serve_cfg
    digest = getattr(s, "auth_token_sha256", None)
    return BearerToken(s.auth_token, s.auth_token_env, s.auth_token_file, digest=digest)


class LocalModel:
    """A fixed predictor as a model source (no Ray, no batching)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    async def predict(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        return self.predictor.predict_records(rows), len(rows)


class PredictEndpoint:
    """`POST /predict` as a bare ASGI app: one record or a non-empty list, validated by
    pydantic-core straight from the request's bytes, answered with pre-encoded JSON."""

    def __init__(
        self,
        source: Any,
        body_type: TypeAdapter,
        limit: int,
        token: BearerToken,
        observe: Callable[[int, float], None] | None = None,
        answered: Callable[[list, list], None] | None = None,
    ):
        self.source, self.body_type, self.limit = source, body_type, limit
        self.token, self.observe, self.answered = token, observe, answered
        self.unauthorized = _json(401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])
        self.too_large = _json(413, {"detail": f"request body over {limit} bytes"})

    async def __call__(self, scope, receive, send) -> None:
        start = time.perf_counter()
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
        if self.observe is not None:
            self.observe(status, time.perf_counter() - start)

    def authorized(self, authorization: bytes) -> bool:
        """Whether an Authorization header value carries the token (any, when none is set)."""
        expected = self.token.current()
        if expected is None:
            return True
        return hmac.compare_digest(hashlib.sha256(authorization).digest(), expected)

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
        if unscorable := [(i, a["error"]) for i, a in enumerate(answers) if "error" in a]:
            # shaped like the validation errors: ("list[Record]", i, field) or ("Record", field)
            many = isinstance(parsed, list)
            detail = []
            for i, e in unscorable:
                loc = ("list[Record]", i) if many else ("Record",)
                loc += (e["field"],) if e["field"] else ()
                detail.append({"field": _field_name(loc), "loc": list(loc), "msg": e["msg"]})
            return _json(422, {"detail": detail})
        for row, a in zip(rows, answers):
            if "id" in row:
                a["id"] = row["id"]
        if self.answered is not None:
            self.answered(rows, answers)
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
    auth_token: str | BearerToken | None,
    model_ref: str = "",
    unknown_categories: str = "bucket",
    observe: Callable[[int, float], None] | None = None,
    answered: Callable[[list, list], None] | None = None,
) -> FastAPI:
    """The app around a model source: a Predictor, or anything with a current `predictor` and an
    async `predict(rows) -> (answers, batch size)` (a Serve replica, which batches and may switch
    versions; the batch size is the records predicted in the call that answered these rows).
    `observe(status, seconds)` is called after each /predict answer, `answered(records,
    answers)` after each one answered 200."""
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
    token = auth_token if isinstance(auth_token, BearerToken) else BearerToken(auth_token)
    endpoint = PredictEndpoint(source, body_type, max_request_bytes, token, observe, answered)
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
            # the version the reference points at, refused: its inputs differ from the served ones
            "refused": getattr(source, "refused", None),
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
        if token.required:
            spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            operation["security"] = [{"bearer": []}]
        spec["paths"]["/predict"] = {"post": operation}
        return spec

    app.openapi = openapi_with_predict  # type: ignore[method-assign]
    return app
