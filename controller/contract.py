"""Pydantic models of every payload in the central MQTT API v1 (central-contract.md).

The central server already depends on these shapes: new optional fields and new event
types are fine, renames are not. docs/mqtt-api.md is generated from this module
(`render_api_doc`) and a test keeps the committed copy current.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

API_VERSION = "v1"
ROOT = "loaxa/" + API_VERSION + "/{site_id}"

Priority = Literal["normal", "priority", "emergency"]
Severity = Literal["critical", "major", "minor", "warning"]
Availability = Literal["online", "offline", "unmonitored", "disabled"]
Timestamp = Annotated[str, Field(description="RFC 3339 UTC, e.g. 2026-01-02T03:04:05.123Z")]

ALARM_CODES = (
    "cluster.offline", "cluster.amplifier_fault", "cluster.speaker_line_fault",
    "cluster.surge_protector_tripped", "cluster.power_loss",
    "cluster.subscription_expiring", "cluster.subscription_expired",
    "transmitter.unreachable", "transmitter.vswr_high", "transmitter.over_temperature",
    "transmitter.pll_unlocked", "transmitter.dead_air",
    "gateway.clock_unsynchronised", "gateway.storage_low", "gateway.audio_device_missing",
    "gateway.security",
)
CLUSTER_CAUSES = (
    "lightning", "subscription_expired", "power_loss", "link_loss", "hardware",
    "vandalism_or_unknown", "unknown",
)
# Error codes of command responses, in the order the gate checks them.
ERROR_CODES = {
    "too_large": "payload larger than max_command_bytes",
    "invalid_json": "payload is not a UTF-8 JSON object",
    "unsigned": "no key_id/signature",
    "invalid_envelope": "envelope fails the command envelope schema",
    "wrong_site": "site_id differs from the topic's site",
    "wrong_command": "command differs from the topic's command",
    "unknown_key": "key_id is not a configured central key",
    "bad_signature": "Ed25519 signature does not verify",
    "stale": "issued_at outside +/- max_command_age of the gateway clock",
    "replayed": "request_id already seen",
    "invalid_args": "args fail the command's schema",
    "not_supported": "no handler for this command on this gateway",
    "internal": "the handler raised an unexpected error (logged on the gateway)",
}


def topic(site_id: str, sub: str) -> str:
    return f"loaxa/{API_VERSION}/{site_id}/{sub}"


def rfc3339(dt: datetime | None = None) -> str:
    """Fixed-width UTC timestamp (millisecond precision) so strings sort like times."""
    dt = (dt or datetime.now(UTC)).astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp that carries an explicit offset (or Z)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError("timestamp needs a UTC offset or Z")
    return dt.astimezone(UTC)


def canonical_json(obj: Any) -> bytes:
    """Bytes that are signed: keys sorted, no whitespace, UTF-8 (not ASCII-escaped)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signing_bytes(envelope: dict) -> bytes:
    return canonical_json({k: v for k, v in envelope.items() if k != "signature"})


def compact(obj: Any) -> bytes:
    """Wire form of everything the gateway publishes (prepaid rural links: no spaces)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Body(BaseModel):
    """Event bodies and alarms: the contract's fields are checked, additions pass through
    (the contract welcomes new optional fields)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


def _check_ts(v: str | None) -> str | None:
    if v is not None:
        parse_rfc3339(v)
    return v


# ---------------------------------------------------------------- retained state
class Status(_M):
    """Birth/death on `status` (retained). The will carries the same session."""

    state: Literal["online", "offline"]
    session: int = Field(ge=1)
    ts: Timestamp
    version: str
    boot_id: str


class GatewayHealth(_M):
    uptime_s: float = Field(ge=0)
    cpu_temp_c: float | None = None
    disk_free_mb: float | None = None
    clock_synced: bool
    outbox_depth: int = Field(ge=0)
    outbox_dropped: int = Field(0, ge=0, description="droppable events discarded since start")


class TransmitterHealth(_M):
    reachable: bool
    on_air: bool | None = None
    frequency_mhz: float | None = None
    forward_w: float | None = None
    reflected_w: float | None = None
    vswr: float | None = None
    temperature_c: float | None = None
    pll_locked: bool | None = None


class ClusterCounts(_M):
    clusters_total: int = Field(ge=0)
    online: int = Field(ge=0)
    offline: int = Field(ge=0)
    unmonitored: int = Field(ge=0)
    faulty: int = Field(ge=0)


class Health(_M):
    """Site snapshot on `health` (retained), on significant change and every health_interval."""

    ts: Timestamp | None = None
    gateway: GatewayHealth
    transmitter: TransmitterHealth | None = None
    counts: ClusterCounts


class Subscription(_M):
    expires_on: str | None = Field(None, description="ISO date")
    days_left: int | None = None


class ClusterState(_M):
    """`clusters/{cluster_id}/state` (retained), published on change."""

    id: str
    kind: Literal["ip", "fm"]
    zone: str
    lat: float | None = None
    lon: float | None = None
    availability: Availability
    last_seen: Timestamp | None = None
    playing: str | None = Field(None, description="programme or broadcast id, null when silent")
    volume: int | None = Field(None, ge=0, le=100)
    rssi_dbm: float | None = None
    subscription: Subscription | None = None
    faults: list[str] = Field(default_factory=list, description="active alarm codes")


class Alarm(_Body):
    """Alarm object: in `alarms` (retained list) and in alarm.* events."""

    alarm_id: str
    code: str = Field(description="one of ALARM_CODES (more may be added)")
    severity: Severity
    cluster_id: str | None = None
    cause: str = Field(description="on cluster alarms: one of CLUSTER_CAUSES")
    confidence: float = Field(ge=0, le=1)
    evidence: list[str] = Field(default_factory=list)
    raised_at: Timestamp
    cleared_at: Timestamp | None = None
    acknowledged_by: str | None = None
    incident_id: str | None = Field(None, description="ties alarms of one area event together")

    @model_validator(mode="after")
    def _cluster_cause(self) -> Alarm:
        if self.cluster_id is not None and self.cause not in CLUSTER_CAUSES:
            raise ValueError(f"cause {self.cause!r} not one of {', '.join(CLUSTER_CAUSES)}")
        return self


class AlarmList(RootModel[list[Alarm]]):
    """`alarms` (retained): a JSON list of the active alarms."""


# ---------------------------------------------------------------- sources / targets
class TtsSpec(_M):
    text: str = Field(min_length=1, max_length=20000)
    voice: str | None = None


class MediaSpec(_M):
    url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class StreamSpec(_M):
    url: str = Field(min_length=1)


class LiveSpec(_M):
    input: str = Field(min_length=1)


class TtsSource(_M):
    tts: TtsSpec


class MediaSource(_M):
    media: MediaSpec


class StreamSource(_M):
    stream: StreamSpec


class LiveSource(_M):
    live: LiveSpec


Source = TtsSource | MediaSource | StreamSource | LiveSource
Targets = Literal["all"] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


# ---------------------------------------------------------------- events
class EventEnvelope(BaseModel):
    """Every message on `events`; the type's body fields sit beside these keys."""

    model_config = ConfigDict(extra="allow")
    id: str
    seq: int = Field(ge=1, description="per site, +1 per event, survives restarts")
    ts: Timestamp
    type: str
    historical: bool = Field(description="created before the connection that delivers it")


class Unreached(_Body):
    cluster: str
    reason: str


class BroadcastRecord(_Body):
    """Body of broadcast.started/finished/preempted/failed/skipped."""

    broadcast_id: str | None = Field(description="null when skipped before it got an id")
    programme_id: str | None = None
    priority: Priority
    source: Source | str = Field(description="the source object, or its kind")
    targets: list[str]
    reached: list[str] = Field(default_factory=list)
    unreached: list[Unreached] = Field(default_factory=list)
    started_at: Timestamp | None = None
    ended_at: Timestamp | None = None
    reason: str | None = Field(None, description="why skipped / failed / preempted")
    preempted_by: str | None = None


class CommandRejected(_Body):
    request_id: str | None
    command: str | None
    reason: str = Field(description="one of the error codes")
    message: str | None = None
    key_id: str | None = None


class ClusterMaintenance(_Body):
    cluster_id: str
    status: str
    cause: str | None = None
    text: str | None = None
    by: str | None = None


class GatewayStarted(_Body):
    version: str
    boot_id: str


class GatewayStopping(_Body):
    reason: str | None = None


class ConfigLoaded(_Body):
    hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the site file")
    path: str | None = None


class OutboxDropped(_Body):
    """Droppable (telemetry-class) events discarded because the outbox was full."""

    dropped: int = Field(ge=1)
    first_seq: int
    last_seq: int
    total: int = Field(ge=1, description="dropped since start")


EVENT_BODIES: dict[str, type[BaseModel]] = {
    "gateway.started": GatewayStarted,
    "gateway.stopping": GatewayStopping,
    "gateway.outbox_dropped": OutboxDropped,
    "config.loaded": ConfigLoaded,
    **{f"broadcast.{k}": BroadcastRecord
       for k in ("started", "finished", "preempted", "failed", "skipped")},
    **{f"alarm.{k}": Alarm for k in ("raised", "cleared", "acknowledged")},
    "command.rejected": CommandRejected,
    "cluster.maintenance": ClusterMaintenance,
}


def validate_event_body(type_: str, body: dict) -> dict:
    """Check a known event type's body; unknown types pass (new types are allowed)."""
    model = EVENT_BODIES.get(type_)
    if model is None:
        return body
    out = model.model_validate(body).model_dump(mode="json")
    # defaults are filled in (the central server may rely on them), unset nulls are not
    return {k: v for k, v in out.items() if v is not None or k in body}


# ---------------------------------------------------------------- commands
class CommandEnvelope(_M):
    request_id: str = Field(min_length=1, max_length=128)
    site_id: str = Field(min_length=1)
    command: str = Field(min_length=1)
    issued_at: Timestamp
    args: dict[str, Any] = Field(default_factory=dict)
    key_id: str = Field(min_length=1)
    signature: str = Field(min_length=1, description="base64 Ed25519 over signing_bytes")

    _ts = field_validator("issued_at")(_check_ts)


class ErrorBody(_M):
    code: str
    message: str


class OkResponse(_M):
    request_id: str | None
    status: Literal["ok"] = "ok"
    data: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(_M):
    request_id: str | None
    status: Literal["error"] = "error"
    error: ErrorBody


class BroadcastStartArgs(_M):
    priority: Priority
    source: Source
    targets: Targets = Field(description='"all", zone ids or cluster ids')
    volume: int | None = Field(None, ge=0, le=100)
    max_duration_s: int | None = Field(None, gt=0, le=86400)
    title: str | None = None


class BroadcastStopArgs(_M):
    broadcast_id: str = Field(min_length=1, description='a broadcast id or "all"')


class CronFields(_M):
    minute: str = "0"
    hour: str = "*"
    day: str = "*"
    month: str = "*"
    day_of_week: str = "*"


class CronRecurrence(_M):
    cron: CronFields


class DatesRecurrence(_M):
    dates: Annotated[list[Timestamp], Field(min_length=1)]

    @field_validator("dates")
    @classmethod
    def _dates(cls, v: list[str]) -> list[str]:
        for d in v:
            parse_rfc3339(d)
        return v


class Programme(_M):
    id: str = Field(min_length=1, max_length=64)
    title: str
    priority: Priority = "normal"
    source: Source
    targets: Targets
    recurrence: CronRecurrence | DatesRecurrence
    duration_s: int | None = Field(None, gt=0, le=86400)
    valid_from: Timestamp | None = None
    valid_until: Timestamp | None = None

    _vf = field_validator("valid_from", "valid_until")(_check_ts)


class SchedulePutArgs(Programme):
    """schedule.put: args are the programme itself."""


class ScheduleDeleteArgs(_M):
    id: str = Field(min_length=1)


class NoArgs(_M):
    pass


class ClusterSetArgs(_M):
    cluster_id: str
    volume: int | None = Field(None, ge=0, le=100)
    enabled: bool | None = None

    @model_validator(mode="after")
    def _any(self) -> ClusterSetArgs:
        if self.volume is None and self.enabled is None:
            raise ValueError("give volume and/or enabled")
        return self


class AlarmAckArgs(_M):
    alarm_id: str
    by: str = Field(min_length=1)


class LogQueryArgs(_M):
    from_: Timestamp = Field(alias="from")
    to: Timestamp
    type: str | None = Field(None, description="exact type, or a prefix ending in '.'")
    limit: int = Field(200, ge=1, le=1000)

    _ft = field_validator("from_", "to")(_check_ts)


COMMAND_ARGS: dict[str, type[BaseModel]] = {
    "broadcast.start": BroadcastStartArgs,
    "broadcast.stop": BroadcastStopArgs,
    "schedule.put": SchedulePutArgs,
    "schedule.delete": ScheduleDeleteArgs,
    "schedule.list": NoArgs,
    "cluster.set": ClusterSetArgs,
    "alarm.ack": AlarmAckArgs,
    "status.get": NoArgs,
    "log.query": LogQueryArgs,
    "rebirth": NoArgs,
}


class StatusGetData(_M):
    health: dict[str, Any] | None
    clusters: list[dict[str, Any]]
    alarms: list[dict[str, Any]]


class LogQueryData(_M):
    events: list[dict[str, Any]]
    truncated: bool



# ---------------------------------------------------------------- generated doc
TOPICS = [
    ("status", "gateway", "yes", 1, "Status", "birth/death; will = offline, same session"),
    ("health", "gateway", "yes", 1, "Health", "on significant change, rate-limited, and every health_interval"),
    ("clusters/{cluster_id}/state", "gateway", "yes", 1, "ClusterState", "on change"),
    ("alarms", "gateway", "yes", 1, "AlarmList", "active alarms, on change"),
    ("events", "gateway", "no", 1, "EventEnvelope", "durable outbox, seq order, at least once"),
    ("resp/{request_id}", "gateway", "no", 1, "OkResponse / ErrorResponse",
     "responses for MQTT 3.1.1 clients (v5: the request's response topic + correlation data)"),
    ("cmd/{command}", "central", "never", 1, "CommandEnvelope", "signed commands"),
]


def json_schemas() -> dict[str, dict]:
    """JSON Schema of every payload, keyed by model name."""
    models: dict[str, type[BaseModel]] = {
        m.__name__: m for m in (
            Status, Health, ClusterState, AlarmList, Alarm, EventEnvelope, CommandEnvelope,
            OkResponse, ErrorResponse, StatusGetData, LogQueryData,
        )
    }
    for m in EVENT_BODIES.values():
        models[m.__name__] = m
    for m in COMMAND_ARGS.values():
        models[m.__name__] = m
    return {name: m.model_json_schema(by_alias=True) for name, m in models.items()}


def render_api_doc() -> str:
    """Markdown for docs/mqtt-api.md (regenerate: python -m controller.contract > docs/mqtt-api.md)."""
    out = [
        "# loaxa MQTT API v1 (gateway <-> central)",
        "",
        "Generated from `controller/contract.py` by `python -m controller.contract`; do not edit.",
        "The binding description is `central-contract.md`; this file gives the exact schemas.",
        "",
        "All topics live under `loaxa/v1/{site_id}/`. Payloads are compact UTF-8 JSON.",
        "Timestamps are RFC 3339 UTC (`2026-01-02T03:04:05.123Z`).",
        "",
        "## Topics",
        "",
        "| topic (under the root) | published by | retain | QoS | payload | when |",
        "|---|---|---|---|---|---|",
    ]
    for t, who, retain, qos, model, when in TOPICS:
        out.append(f"| `{t}` | {who} | {retain} | {qos} | {model} | {when} |")
    out += [
        "",
        "## Session, sequence and `historical`",
        "",
        "- `status.session` comes from a persistent counter incremented before every connection",
        "  attempt; the will (`offline`) carries the same session. A clean stop publishes `offline`",
        "  itself, waits for the broker's acknowledgement, then disconnects.",
        "- `events.seq` starts at 1 and grows by exactly one per event across restarts and power",
        "  cuts. A gap means loss; the only deliberate loss is of droppable (telemetry-class)",
        "  events when the outbox is full, announced by a durable `gateway.outbox_dropped` event",
        "  naming the dropped range.",
        "- An event is `historical: true` when it was created before the MQTT connection that",
        "  delivers it was established (it waited out an outage, a restart, or a lost PUBACK).",
        "  Events created after the CONNACK are live (`false`), even if queued behind a backlog.",
        "  A duplicate keeps its `id` but may differ in `historical`.",
        "- An event leaves the outbox only when the broker acknowledges it (QoS 1 PUBACK); after",
        "  a reconnect the gateway resends from the oldest unacknowledged event. End to end this",
        "  also needs a broker that persists messages and a central subscriber with a persistent",
        "  QoS 1 session: if a broker dies after acknowledging, the central server sees the gap",
        "  and fetches the range with `log.query`.",
        "",
        "## Commands",
        "",
        "Signature: base64 Ed25519 over the canonical JSON of every envelope field except",
        "`signature` (keys sorted, separators `,` `:`, UTF-8, non-ASCII not escaped).",
        "Checks, in order; the first failure answers `{\"request_id\",\"status\":\"error\",",
        "\"error\":{\"code\",\"message\"}}` and emits a `command.rejected` event with",
        "`reason` = the code:",
        "",
        "| code | meaning |",
        "|---|---|",
    ]
    out += [f"| `{c}` | {m} |" for c, m in ERROR_CODES.items()]
    out += [
        "",
        "Handlers may answer other codes (e.g. `not_found`, `busy`).",
        "",
        "| command | args schema |",
        "|---|---|",
    ]
    out += [f"| `{c}` | {m.__name__} |" for c, m in COMMAND_ARGS.items()]
    out += ["", "## Event types", "", "| type | body schema |", "|---|---|"]
    out += [f"| `{t}` | {m.__name__} |" for t, m in EVENT_BODIES.items()]
    out += ["", "Known alarm codes: " + ", ".join(f"`{c}`" for c in ALARM_CODES) + ".", "",
            "Cluster alarm causes: " + ", ".join(f"`{c}`" for c in CLUSTER_CAUSES) + ".", "",
            "## JSON Schemas", ""]
    for name, schema in json_schemas().items():
        out += [f"### {name}", "", "```json", json.dumps(schema, indent=2, ensure_ascii=False),
                "```", ""]
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.stdout.write(render_api_doc())
