"""The `serve` section of a pipeline config (also the Serve application's arguments), and the
`predict` section (batch inference)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dcml.config_sections import _Section


class ServeAutoscaling(_Section):
    """Ray Serve's `autoscaling_config`; a field left unset keeps Serve's default."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(
        8, gt=0, description="Requests in flight per replica that autoscaling aims at."
    )
    upscale_delay_s: float | None = Field(None, ge=0, description="Load this long before adding.")
    downscale_delay_s: float | None = Field(
        None, ge=0, description="Quiet this long before removing a replica."
    )
    metrics_interval_s: float | None = Field(
        None, gt=0, description="How often replicas report their load."
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="The window that load is averaged over."
    )

    @model_validator(mode="after")
    def _order(self) -> ServeAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}"
            )
        return self


# Where a server's bearer token comes from: one at most (ServeArgs adds auth_token_sha256).
TOKEN_SOURCES = ("auth_token", "auth_token_env", "auth_token_file", "auth_token_sha256")


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="HTTP bind address; loopback unless told otherwise.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field("dcml", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="Route prefix of the application.")
    num_replicas: int = Field(1, ge=1, description="Replicas of the model deployment.")
    autoscaling: ServeAutoscaling | None = Field(
        None, description="Set to autoscale replicas on load (num_replicas is then ignored)."
    )
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica.")
    use_gpu: bool = Field(False, description="One GPU per replica; the model runs on it.")
    max_batch_size: int = Field(
        256, ge=1, description="Dynamic batching: most records predicted in one call."
    )
    batch_wait_s: float = Field(
        0.0,
        ge=0,
        description="Dynamic batching: longest wait for more requests to batch (0: batch the "
        "requests that queued while the last batch ran, adding no latency).",
    )
    reload_s: float = Field(
        5.0,
        ge=0,
        description="How often replicas check where the served alias points and switch to its "
        "version (0: never).",
    )
    unknown_categories: Literal["bucket", "reject"] = Field(
        "bucket",
        description="A category not seen in training: the unknown bucket (as in training), or 422.",
    )
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Larger bodies get 413.")
    drain_s: float = Field(
        20.0,
        gt=0,
        description="On stop (SIGTERM, Ctrl-C, a deleted application) a replica takes no new "
        "requests and finishes those it accepted, waiting up to this long.",
    )
    auth_token: str | None = Field(None, min_length=1, description="Bearer token (never stored).")
    auth_token_env: str | None = Field(None, description="Bearer token from this env variable.")
    auth_token_file: str | None = Field(None, description="Bearer token from this file, re-read.")
    demo_rows: int = Field(8, ge=0, description="`dcml run`: test rows sent over HTTP and shown.")
    metrics: bool = Field(
        True, description="Export the model's metrics (requests, latency, predictions) to Ray's."
    )
    log_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of served records stored with their predictions under "
        "predictions/<model>/<version>/ (for `dcml monitor`); 0: none.",
    )
    log_flush_rows: int = Field(1000, ge=1, description="Prediction log: records per file.")
    log_flush_s: float = Field(
        60.0, gt=0, description="Prediction log: longest wait before writing what is sampled."
    )
    log_buffer_rows: int = Field(
        100_000,
        ge=1,
        description="Prediction log: records a replica holds unwritten; past it, samples are "
        "dropped (and counted), never waited for.",
    )

    @model_validator(mode="after")
    def _one_token_source(self) -> ServeConfig:
        given = [n for n in TOKEN_SOURCES if getattr(self, n, None)]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(given)}, not both")
        return self


class PredictConfig(_Section):
    """`dcml predict`: batch inference over stored raw data."""

    passthrough: list[str] = Field(
        default_factory=list,
        description="Input columns copied to the output beside the id and the prediction.",
    )
    engine: Literal["auto", "local", "ray"] = Field(
        "auto",
        description="'local': threads in the dcml process (no Ray); 'ray': Ray Data on the "
        "cluster. 'auto': local where dcml would start a Ray of its own just for this "
        "(no cluster.address, no RAY_ADDRESS), else ray.",
    )
    threads: int | None = Field(
        None, ge=1, description="Threads of the local engine; None: cluster.num_cpus, else cores."
    )
    batch_size: int = Field(65_536, ge=1, description="Rows per model call.")
    log_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of scored rows also stored in the prediction log "
        "(predictions/<model>/<version>/, read by `dcml monitor`); 0: none.",
    )
    use_gpu: bool | None = Field(
        None,
        description="Score on a GPU (each Ray Data task takes one); None: as train.use_gpu.",
    )
