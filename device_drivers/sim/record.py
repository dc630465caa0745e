"""The scenario record: JSON lines an outside checker reads (simulation.md, "Record file").

One object per line, in time order, `t` = seconds since the scenario started. Each
line is flushed as it is written so a checker (or `loaxa demo`'s live view) can tail
the file while the run goes on. Writers call from several threads (paho's network
thread, the runner's loop), so one lock orders both the clock reading and the write:
`t` never goes backwards in the file.

Kinds: mqtt, response, cluster, transmitter, scenario. The record never depends on
the daemon's internals: it holds what the simulated central server received and what
the simulated devices observed.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

KINDS = ("mqtt", "response", "cluster", "transmitter", "scenario")


def parse_payload(payload: bytes) -> Any:
    """JSON where it is JSON, else the text (undecodable bytes replaced)."""
    text = payload.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


class Recorder:
    """Append-only JSONL writer; `on_record(obj)` sees each line as written (keep it quick).

    With `started=False`, lines written before `start_clock()` (the initial ground truth of
    every simulator, gathered while the site is being built) are held and written at t=0
    when the scenario starts, so the file stays in time order."""

    def __init__(self, path: str | Path, *, on_record: Callable[[dict], Any] | None = None,
                 started: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.on_record = on_record
        self.count = 0
        self._last_cluster: dict[str, tuple] = {}
        self._last_tx: dict | None = None
        self._held: list[tuple[str, dict]] | None = None if started else []

    def start_clock(self, first: dict | None = None) -> None:
        """t = 0 from now (the scenario's start): the `first` scenario event, then the held
        lines, are written at t=0."""
        with self._lock:
            self._t0 = time.monotonic()
            held, self._held = self._held or [], None
        if first is not None:
            self.scenario(first)
        for kind, fields in held:
            self.write(kind, **fields)

    def now(self) -> float:
        return time.monotonic() - self._t0

    def write(self, kind: str, **fields: Any) -> dict | None:
        with self._lock:
            if self._f.closed:
                return None
            if self._held is not None:
                self._held.append((kind, fields))
                return None
            obj = {"t": round(time.monotonic() - self._t0, 3), "kind": kind, **fields}
            self._f.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
                                     default=str) + "\n")
            self._f.flush()
            self.count += 1
            if self.on_record is not None:
                try:
                    self.on_record(obj)
                except Exception:  # a live view must not stop the recording
                    log.exception("record.on_record_failed")
            return obj

    # ---- typed helpers -------------------------------------------------------------
    def mqtt(self, topic: str, payload: bytes, *, retain: bool, qos: int) -> dict | None:
        return self.write("mqtt", topic=topic, payload=parse_payload(payload),
                          retain=bool(retain), qos=int(qos))

    def response(self, request_id: str | None, payload: Any) -> dict | None:
        return self.write("response", request_id=request_id, payload=payload)

    def cluster(self, cluster: str, playing: bool, programme: str | None = None,
                volume: int | None = None, **extra: Any) -> dict | None:
        """Ground truth of one cluster; repeated identical states are not written again."""
        key = (bool(playing), programme, volume, tuple(sorted(extra.items())))
        with self._lock:
            if self._last_cluster.get(cluster) == key:
                return None
            self._last_cluster[cluster] = key
        fields: dict[str, Any] = {"cluster": cluster, "playing": bool(playing)}
        if programme is not None:
            fields["programme"] = programme
        if volume is not None:
            fields["volume"] = volume
        return self.write("cluster", **fields, **extra)

    def transmitter(self, state: dict[str, Any]) -> dict | None:
        """Ground truth of the transmitter (carrier, frequency_mhz, power_w, rds, ...), on change."""
        with self._lock:
            if self._last_tx == state:
                return None
            self._last_tx = json.loads(json.dumps(state, default=str))
        return self.write("transmitter", **state)

    def scenario(self, event: dict[str, Any]) -> dict | None:
        return self.write("scenario", event=event)

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.close()


def read_record(path: str | Path) -> list[dict]:
    """Every complete line of a record (a partly written last line is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def follow(path: str | Path, stop: Callable[[], bool], poll_s: float = 0.1) -> Iterator[dict]:
    """Tail a record being written, yielding each object; ends when `stop()` is true."""
    pos = 0
    buf = ""
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
        except FileNotFoundError:
            chunk = ""
        buf += chunk
        *lines, buf = buf.split("\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
        if not chunk:
            if stop():
                return
            time.sleep(poll_s)
