"""Configuration from the environment (`MAGASIN_*`), with safe defaults for embedded mode."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob magasin reads; each field is `MAGASIN_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MAGASIN_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Where embedded mode keeps its files.")
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/magasin",
        description="PostgreSQL of distributed mode.",
    )
    database_schema: str = Field(
        "", description="PostgreSQL schema of the tables; empty = `magasin_<service>`."
    )
    pg_pool_max: int = Field(
        10, ge=1, description="PostgreSQL connections of a process's pool; the process holds "
        "one more (its listener): `pg_pool_max + 1` per process.",
    )
    pg_cluster_processes: int = Field(
        6, ge=1, description="Processes of the distributed deployment sharing the PostgreSQL "
        "server (`cluster up` sets it to its plan's count): a process refuses to start when "
        "`pg_cluster_processes × (pg_pool_max + 1)` exceeds the server's max_connections "
        "minus its reserved connections.",
    )
    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ of distributed mode."
    )
    amqp_namespace: str = Field("magasin", description="Prefix of exchange and queue names.")
    sqlite_synchronous: str = Field(
        "FULL", pattern="^(OFF|NORMAL|FULL|EXTRA)$", description="SQLite durability level."
    )
    retry_attempts: int = Field(3, ge=1, description="Handler attempts before dead-letter.")
    retry_initial_delay: float = Field(1.0, ge=0, description="First retry delay, seconds.")
    retry_multiplier: float = Field(2.0, ge=1, description="Backoff multiplier.")
    outbox_batch_size: int = Field(500, ge=1, description="Events per relay publish batch.")
    archive_linger_s: float = Field(
        0.2, ge=0, description="Distributed: how long a relay lets published events gather "
        "before it ships them, as one message, to the consumers of every event (the audit, "
        "the event store's archive), s.",
    )
    publish_all: bool = Field(
        False, description="Distributed: publish every stored event to the events exchange, "
        "not only the messages some service consumes (`shared.events.CONSUMED`): for "
        "consumers outside magasin bound to a context's internal events (StockReserved...).",
    )
    projection_linger_s: float = Field(
        0.1, ge=0, description="How long a projection that is not inline waits after "
        "committing a batch before it reads the next, so that one commit takes the events of "
        "the sales meanwhile; its documents trail the log by up to that much more, s. "
        "Distributed, every such projection (the inventory's stock levels, the store's "
        "catalog...); embedded, the audit chain only.",
    )
    http_host: str = Field("127.0.0.1", description="Address the HTTP API listens on.")
    http_port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP API.")
    api_keys: str = Field(
        "", description="Comma-separated API keys; empty in embedded mode = one generated key."
    )
    currency: str = Field("CAD", pattern="^[A-Z]{3}$", description="Currency of the catalog.")
    saga_mode: str = Field(
        "choreography", pattern="^(choreography|orchestration)$",
        description="How sales are coordinated: events (choreography) or the orchestrator.",
    )
    saga_orchestrate: str = Field(
        "", description="Hybrid rule sending some sales to the orchestrator whatever the "
        "mode, e.g. `store:S1,method:card,amount_over:500` (any term matches).",
    )
    bank_latency_ms: float = Field(100.0, ge=0, description="Simulated bank call latency.")
    bank_concurrency: int = Field(
        32, ge=1, description="Bank calls (sales being charged or refunded) in flight at once."
    )
    metrics_sample_s: float = Field(
        5.0, gt=0, description="How often the sampled gauges (backlogs, lags, active sagas) "
        "are refreshed for /metrics, seconds."
    )
    bank_decline_rate: float = Field(
        0.0, ge=0, le=1, description="Share of charges the simulated bank declines at random."
    )
    bank_seed: int | None = Field(None, description="Seed of the bank's random declines.")
    bank_answer_latency_ms: float = Field(
        0.0, ge=0, description="Simulated bank: time its answer takes to come back once it "
        "recorded a call (the window a crash leaves money at the bank in)."
    )
    reconcile_every_s: float = Field(
        60.0, gt=0, description="How often the payment service reconciles with the bank."
    )
    reconcile_grace_s: float = Field(
        60.0, ge=0, description="A failed payment is checked at the bank only this long after "
        "it failed, so a charge still on its way has answered."
    )
    breaker_failure_rate: float = Field(
        0.5, gt=0, le=1, description="Bank breaker opens at this failure rate of the window."
    )
    breaker_window: int = Field(10, ge=1, description="Bank breaker: last calls it judges by.")
    breaker_min_calls: int = Field(5, ge=1, description="Bank breaker: calls before judging.")
    breaker_open_s: float = Field(30.0, ge=0, description="Bank breaker: seconds kept open.")
    breaker_half_open_calls: int = Field(
        3, ge=1, description="Bank breaker: trial calls that must succeed to close it."
    )
    reservation_ttl_s: float = Field(1800.0, gt=0, description="Reservation lifetime, seconds.")
    reservation_sweep_s: float = Field(
        5.0, gt=0, description="How often expired reservations are looked for, seconds."
    )
    deadline_order_s: float = Field(
        120.0, gt=0, description="A choreographed saga whose order (payment, reservation, "
        "preparation) is not reported prepared after this long is compensated."
    )
    deadline_payment_s: float = Field(
        60.0, gt=0, description="A charge the bank could not take for this long fails "
        "(bank_unavailable); an orchestrated saga waiting this long for its payment is "
        "compensated."
    )
    deadline_reservation_s: float = Field(
        30.0, gt=0, description="An orchestrated paid saga waiting this long for its stock is "
        "compensated."
    )
    deadline_fulfilment_s: float = Field(
        30.0, gt=0, description="An orchestrated reserved saga waiting this long for its order "
        "is compensated."
    )
    deadline_compensation_s: float = Field(
        30.0, gt=0, description="A compensating saga not cancelled after this long has its "
        "compensation (refund, release) asked for again; the first of its retry delays."
    )
    compensation_retry_multiplier: float = Field(
        2.0, ge=1, description="Each retry of a stuck compensation waits this much longer."
    )
    compensation_retry_max_delay_s: float = Field(
        600.0, gt=0, description="Longest wait between two retries of a stuck compensation."
    )
    compensation_max_attempts: int = Field(
        5, ge=0, description="Retries of a stuck compensation before it is reported stuck "
        "(metric magasin_sagas_stuck, alert, `GET /api/sagas?stuck=true`)."
    )
    deadline_sweep_s: float = Field(
        1.0, gt=0, description="How often sagas past their step's deadline are looked for."
    )
    admin_api_keys: str = Field(
        "", description="Comma-separated API keys that may also run admin operations."
    )

    gateway_rate_per_s: int = Field(
        1000, ge=1, description="Gateway: requests per second allowed per API key."
    )
    gateway_burst: int = Field(
        2000, ge=0, description="Gateway: requests per API key allowed above the rate at once."
    )
    gateway_max_body: str = Field(
        "1m", pattern=r"^[0-9]+[kKmM]?$", description="Gateway: largest request body (nginx size)."
    )
    gateway_timeout_s: int = Field(
        30, ge=1, description="Gateway: seconds a service may take to answer (then 504)."
    )
    gateway_stream_timeout_s: int = Field(
        3600, ge=1, description="Gateway: seconds a Server-Sent Events stream may stay quiet."
    )
    trace_url: str = Field(
        "", description="Trace viewer URL with `{trace_id}` (e.g. Jaeger's "
        "`http://localhost:16686/trace/{trace_id}`): the console links each sale's trace there."
    )

    snapshot_every: int = Field(
        100, ge=0, description="Snapshot an aggregate every N events; 0 = no snapshots."
    )

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "magasin.db"
