"""The one typed settings object: defaults < config.toml < APPLIANCE_* environment < CLI flags.

Loaded once at start. An unknown key or a bad value is a ConfigError that names the key.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "APPLIANCE_"
# The project's environment variables that are not settings: where the config file is, the
# batch CLI's server and key (`appliance batch --url/--key`; the console's example curl
# exports APPLIANCE_KEY) and where the browser tests copy their screenshots. Any other
# APPLIANCE_* name is a setting, and an unknown one is an error, as in the file.
ENV_NOT_SETTINGS = {
    "APPLIANCE_CONFIG",
    "APPLIANCE_URL",
    "APPLIANCE_KEY",
    "APPLIANCE_CONSOLE_SCREENSHOTS",
}
DEFAULT_CONFIG_FILE = "config.toml"
DEFAULT_DIRS = {"data_dir": "data", "models_dir": "quantized_models"}

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    """Address to bind."""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8080
    """TCP port."""
    max_body_bytes: Positive = 1_048_576
    """Largest request body on real-time endpoints; bigger bodies get 413."""
    max_batch_items: Positive = 1000
    """Most items in one batch request; more get 422."""
    log_level: Annotated[str, msgspec.Meta(pattern="^(?i:debug|info|warning|error|critical)$")] = (
        "info"
    )
    """Python logging level name."""
    log_format: Annotated[str, msgspec.Meta(pattern="^(json|text)$")] = "json"
    """json: one JSON object per line (request id on every request line); text: plain."""
    shutdown_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    """On SIGTERM, how long in-flight requests may take to finish."""
    read_timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    """A request whose head or body goes this long without a byte is answered 408 and its
    connection closed (a stalled client holds nothing for ever; big uploads keep sending)."""
    keep_alive_seconds: Annotated[float, msgspec.Meta(gt=0)] = 75.0
    """An idle keep-alive connection is closed after this long. Longer than the idle timeout
    of the proxy in front (ingress-nginx and cloud load balancers: 60 s), so the proxy closes
    first and never sends a request down a connection this server is closing (a 502)."""
    workers: Positive = 1
    """Processes serving the port (SO_REUSEPORT: the kernel spreads connections), each with
    its share of the cores. Above 1 without [cluster], limits, quotas and stores switch to
    backends that are exact across processes (SQLite and file locks in data_dir)."""


class RuntimeConfig(_Section):
    providers: list[str] = msgspec.field(default_factory=lambda: ["CPUExecutionProvider"])
    """onnxruntime execution providers in order of preference; unavailable ones are skipped."""
    streams: NonNegative = 0
    """Model calls run at once per model; 0: one per core for encoders, one for decoders."""
    intra_op_threads: NonNegative = 0
    """Threads inside one operator, per stream; 0: the cores shared out among the streams."""
    inter_op_threads: Positive = 1
    """Threads across independent operators."""
    lone_call_threads: NonNegative = 0
    """Threads of a lone request's text-encoder call, in a second session of the model (its
    own copy of the weights); 0: every core this process may use; 1: no second session."""
    max_batch_size: Positive = 32
    """Most items the batcher puts in one model call."""
    max_batch_tokens: Positive = 512
    """Token budget of one model call (items x padded length); one longer item runs alone.
    Small on CPU: 128-token texts ran 114 vs 89 requests/s with 512 vs 4096 (2 cores)."""
    max_wait_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """How long the batcher waits for more work once it has some (0: take what is queued)."""
    max_queue: Positive = 4096
    """Items waiting per model before new requests get 503 Overloaded."""
    warmup: bool = True
    """Run each model once at start so the first request is not slow."""


class AuthConfig(_Section):
    keys_file: str = "keys.json"
    """API keys file, relative to data_dir unless absolute. Secrets are stored hashed."""
    bootstrap_admin_key: bool = True
    """When no key exists, create an admin key at start and write it to data_dir/admin.key."""
    admin_key_file: str = ""
    """A file holding an admin key secret (e.g. a mounted Kubernetes Secret): read at start and,
    if no key has that secret yet, added as an admin key (stored hashed; the file is only read).
    Set, it replaces the generated first-start key. Empty: off."""
    open_metrics: bool = True
    """Serve /metrics without a key (false: it needs an admin key)."""


class LimitsConfig(_Section):
    requests_per_minute: Positive = 600
    """Default per-key request rate (a key's own limit overrides it)."""
    tokens_per_minute: Positive = 1_000_000
    """Default per-key tokenizer-token rate (a key's own limit overrides it)."""
    max_generation_positions: Positive = 16_384
    """Most key/value-cache positions one generation or summarisation request may hold: the
    sum over its inputs of rows (num_beams, or num_generations without beams) times (prompt
    tokens + max_length). Checked after tokenising, before any model call (422 over it).
    16384 is two full 8192-token contexts of the default SmolLM2-135M (45 KB of float32
    cache per position: about 750 MB at the limit); 16 beams over a 6,000-token prompt need
    ~112,000."""


class CacheConfig(_Section):
    enabled: bool = True
    """Keep answers on disk and serve repeats without running the model."""
    dir: str = "cache"
    """Relative to data_dir unless absolute."""
    size_limit_mb: Positive = 1024
    """Least recently stored entries are evicted beyond this."""
    ttl_seconds: Positive = 7 * 86400
    """An entry older than this is a miss."""
    memory_mb: NonNegative = 16
    """The entries used last are also kept in memory, up to this many MB per process (a
    repeat skips the disk lookup); 0: off."""
    scope: Literal["key", "shared"] = "key"
    """"key": each API key has its own entries (the key id is part of the cache key), so one
    key cannot learn from X-Cache: HIT what another key sent. "shared": one entry serves
    every key (more hits, but that side channel is open)."""


class ClassifiersConfig(_Section):
    max_per_key: Positive = 100
    """Saved classifiers one (non-admin) key may own; past it POST /v1/classifiers is 422
    CLASSIFIER_LIMIT. Admin-made (shared) classifiers are not counted."""


class PipelinesConfig(_Section):
    max_per_key: Positive = 100
    """Saved pipelines one (non-admin) key may own; past it POST /v1/pipelines is 422
    PIPELINE_LIMIT. Admin-made (shared) pipelines are not counted."""


class ModelsConfig(_Section):
    lazy: bool = False
    """Open each model at its first request instead of at start: less memory for models
    nobody calls (files are still verified at start); that first request waits for the load."""
    watch_interval_seconds: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    """How often models_dir is rescanned for added, replaced or removed folders (0: never)."""
    retire_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    """A replaced or deleted model keeps answering requests that already chose it this long."""
    max_upload_bytes: Positive = 5 * 1024**3
    """Largest model zip accepted by POST /v1/models and upload URLs."""
    max_unpacked_bytes: Positive = 20 * 1024**3
    """Largest total size a model zip may unpack to."""
    max_compression_ratio: Positive = 200
    """Zip members compressed more than this are refused (zip bombs)."""
    build_timeout_seconds: Positive = 3600
    """A background export taking longer than this fails."""


class UsageConfig(_Section):
    retention_days: Annotated[float, msgspec.Meta(gt=0)] = 90
    """Request log rows older than this are deleted (token spend for quotas is kept)."""


class JobsConfig(_Section):
    dir: str = "jobs"
    """Where async batch jobs keep their input, results and state; relative to data_dir."""
    max_upload_bytes: Positive = 5 * 1024**3
    """Largest NDJSON upload to POST /v1/batch; bigger uploads get 413."""
    max_running: Positive = 2
    """Jobs running at once; starting one more gets 409."""
    chunk_lines: Positive = 64
    """Lines given to the models together, then written and checkpointed (fsync) as one."""
    write_cache: bool = False
    """Store job answers in the response cache (they are always looked up in it)."""
    stop_timeout_seconds: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    """On shutdown, how long a running job may take to checkpoint its current chunk."""
    max_jobs_per_key: Positive = 20
    """Jobs one key may keep (any status); creating one more gets 429 TOO_MANY_JOBS."""
    max_bytes_per_key: Positive = 20 * 1024**3
    """Uploaded bytes one key's kept jobs may hold together; over it: 413 JOB_STORAGE_EXCEEDED."""
    min_free_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024**3
    """Free disk kept in reserve: an upload that would eat into it gets 507 INSUFFICIENT_STORAGE."""
    retention_days: Annotated[float, msgspec.Meta(gt=0)] = 7
    """Finished (completed, failed, cancelled) jobs and their files are removed after this."""


class FallbacksConfig(_Section):
    """Tasks served by the default instruct generator when no dedicated model is installed:
    /v1/qa (answers snapped to a span of the context) and /v1/summarisation."""

    enabled: bool = True
    """false: those endpoints need a dedicated model (else 422/404 naming the export)."""
    generator: str = ""
    """The text-generation model's slug; empty: the first installed text-generation model."""


class ClusterConfig(_Section):
    """Shared state for several replicas behind one load balancer. Both URLs empty (the
    default): a single box, all state under data_dir, no Redis or PostgreSQL client imported."""

    database_url: str = ""
    """postgresql://user:pass@host:5432/db: keys, classifiers, usage, logs, quota spend, jobs."""
    redis_url: str = ""
    """redis://host:6379/0 (rediss:// for TLS): limits, quota counters, shared cache, events."""
    replica_id: str = msgspec.field(default_factory=socket.gethostname)
    """This replica's name in leases, logs and metrics (default: the hostname)."""
    on_redis_down: Literal["fail_closed", "fail_open"] = "fail_closed"
    """Redis unreachable: refuse requests that need a limit or quota decision (503
    BACKEND_UNAVAILABLE) or admit them (logged, counted in a metric)."""

    @property
    def enabled(self) -> bool:
        return bool(self.database_url or self.redis_url)


class DefaultsConfig(_Section):
    """The model a route uses when a request names none (TEI's /embed, /predict, /rerank,
    /tokenize, /info). Empty: the first installed model of that kind the key may use."""

    embedding: str = ""
    """Slug (or alias) of the default embedding model (task feature-extraction)."""
    classifier: str = ""
    """Slug of the default classifier (task text-classification)."""
    reranker: str = ""
    """Slug of the default reranker: a cross-encoder (text-ranking), else an embedding model."""


class Settings(_Section):
    data_dir: str = DEFAULT_DIRS["data_dir"]
    """All state: keys, cache, usage, jobs. Override: APPLIANCE_DATA_DIR."""
    models_dir: str = DEFAULT_DIRS["models_dir"]
    """Exported models, one folder each. Override: APPLIANCE_MODELS_DIR."""
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    classifiers: ClassifiersConfig = msgspec.field(default_factory=ClassifiersConfig)
    pipelines: PipelinesConfig = msgspec.field(default_factory=PipelinesConfig)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    defaults: DefaultsConfig = msgspec.field(default_factory=DefaultsConfig)
    fallbacks: FallbacksConfig = msgspec.field(default_factory=FallbacksConfig)
    aliases: dict[str, str] = msgspec.field(default_factory=lambda: {"english": "all-minilm-l6-v2"})
    """Model names of the task API (english, multilingual, clip, ...) mapped to slugs."""
    endpoint_aliases: dict[str, dict[str, str]] = msgspec.field(default_factory=dict)
    """Per-endpoint overrides of `aliases`, e.g. {"qa": {"english": "my-squad-model"}}: the
    task API calls every model "english", but each task needs its own."""

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def models_path(self) -> Path:
        return Path(self.models_dir)

    @property
    def keys_path(self) -> Path:
        return self.data_path / self.auth.keys_file

    @property
    def cache_path(self) -> Path:
        return self.data_path / self.cache.dir

    @property
    def usage_path(self) -> Path:
        return self.data_path / "usage.db"


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names it."""


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """APPLIANCE_DATA_DIR -> data_dir; APPLIANCE_SERVER__PORT -> server.port."""
    layer: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_SETTINGS:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name}: not valid JSON ({exc})") from None
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return layer


def _resolve_paths(layer: dict[str, Any], base: Path) -> dict[str, Any]:
    for key in ("data_dir", "models_dir"):
        if isinstance(layer.get(key), str) and not os.path.isabs(layer[key]):
            layer[key] = str(base / layer[key])
    return layer


def _describe(exc: msgspec.ValidationError) -> str:
    # msgspec says "... - at `$.server.port`"; users know the key as server.port.
    return str(exc).replace("`$.", "`").replace("- at `$`", "").strip()


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings. Without a config file, ./config.toml is read if present.

    Relative paths in the file are relative to the file; from the environment or flags,
    to the working directory.
    """
    environ = os.environ if environ is None else environ
    explicit = config_file or environ.get("APPLIANCE_CONFIG")
    path = Path(explicit) if explicit else Path(DEFAULT_CONFIG_FILE)
    layers: list[dict[str, Any]] = []
    if path.is_file():
        try:
            layers.append(_resolve_paths(tomllib.loads(path.read_text()), path.parent.resolve()))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    elif explicit:
        raise ConfigError(f"config file not found: {path}")
    layers.append(_resolve_paths(_env_layer(environ), Path.cwd()))
    layers.append(_resolve_paths({k: v for k, v in (overrides or {}).items()}, Path.cwd()))
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer)
    for key, default in DEFAULT_DIRS.items():
        merged.setdefault(key, str(Path.cwd() / default))
    try:
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {_describe(exc)}") from None
