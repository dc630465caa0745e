"""`loaxa demo`: the simulated Bình Lư commune living through a day, in about two minutes.

The scenario runner (device_drivers/sim/runner.py) does the work — its own mosquitto, every
device simulator, the real daemon as a child process — in a worker thread; this command only
watches the record it writes. Records arrive on the runner's threads and are handed over a
queue, so the view is folded and drawn from the main thread alone. Ctrl-C (or SIGTERM) sets
the runner's stop event; its teardown kills what it started, and the live display is closed
by its context manager whatever happens, so the terminal is always given back.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import structlog
import yaml

if TYPE_CHECKING:       # rich is imported only when the demo runs, not by every `loaxa` call
    from controller.demo_view import DemoView

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SITE = PROJECT_ROOT / "config" / "binhlu.yaml"
EXIT_INVALID, EXIT_INTERRUPTED = 2, 130


def trimmed_scenario(src: Path, seconds: float, out_dir: Path) -> Path:
    """A copy of the scenario that lasts `seconds`, without the events it no longer reaches."""
    from device_drivers.sim.scenario import parse_duration

    data = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    data["duration"] = seconds
    data["events"] = [e for e in data.get("events") or []
                      if isinstance(e, dict) and parse_duration(e.get("at", 0)) < seconds]
    out = out_dir / src.name
    out.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return out


def _zones(cfg: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    rows = [(z.id, [(c.id, c.kind) for c in cfg.clusters if c.zone == z.id]) for z in cfg.zones]
    return [r for r in rows if r[1]]


def _route_logs(path: Path | None) -> Any:
    """In-process warnings (the runner's) must not scribble over the live view: to a file."""
    from controller import logs

    logs.setup("warning", json=False)
    if path is None:
        return None
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed at the end of the run
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=f))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.StreamHandler(f))
    return f


class LogPrinter:
    """`--no-ui`: one line per notable record; ground-truth playing changes arriving together
    (a whole FM network switching on) are folded into one line."""

    def __init__(self, echo: Any):
        self.echo = echo
        self.batch: dict[bool, list[str]] = {}
        self.batch_t: float | None = None

    def feed(self, r: dict) -> None:
        if r.get("kind") == "cluster" and "alive" not in r:
            if self.batch_t is not None and r["t"] - self.batch_t > 0.5:
                self.flush()
            self.batch_t = r["t"] if self.batch_t is None else self.batch_t
            self.batch.setdefault(bool(r.get("playing")), []).append(r["cluster"])
            return
        from controller.demo_view import log_line

        self.flush()
        line = log_line(r)
        if line:
            self.echo(line)

    def flush(self) -> None:
        from controller.demo_view import compress_ids

        if self.batch_t is None:
            return
        parts = [f"{'playing' if k else 'silent'} {compress_ids(v)}" for k, v in self.batch.items()]
        self.echo(f"[{self.batch_t:7.2f}] ground truth: {'; '.join(parts)}")
        self.batch, self.batch_t = {}, None


def run_demo(site: Path, scenario: Path, record: Path, *, ui: bool, console: Any,
             zones: list, title: str, duration: float) -> int:
    from controller.demo_view import DemoView
    from device_drivers.sim.runner import run_scenario

    records: queue.SimpleQueue[dict] = queue.SimpleQueue()
    stop = threading.Event()
    reports: list[str] = []
    result: dict[str, int] = {}

    def work() -> None:
        try:
            result["rc"] = run_scenario(site, scenario, record, on_record=records.put,
                                        stop_event=stop, report=reports.append)
        except BaseException as e:  # never leave the main thread waiting
            reports.append(f"demo failed: {type(e).__name__}: {e}")
            result["rc"] = 1

    signals = {"n": 0}

    def on_signal(signum: int, frame: Any) -> None:
        signals["n"] += 1
        stop.set()
        if signals["n"] >= 3:          # the impatient way out; children die with us
            raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=work, name="demo-runner", daemon=True)
    view = DemoView(zones, title=title, duration=duration,
                    ascii_only=not (console.encoding or "").lower().startswith("utf"))
    try:
        worker.start()
        if ui:
            _live(console, view, records, worker, stop)
        else:
            printer = LogPrinter(lambda line: click.echo(line))
            click.echo(f"loaxa demo: {title} ({duration:.0f} s); starting the simulated site...")
            while worker.is_alive() or not records.empty():
                try:
                    printer.feed(records.get(timeout=0.2))
                except queue.Empty:
                    printer.flush()
            printer.flush()
        worker.join()
    except KeyboardInterrupt:
        click.echo("interrupted again: leaving now (children stop with us).", err=True)
        return EXIT_INTERRUPTED
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for line in reports:
        click.echo(line, err=True)
    rc = result.get("rc", 1)
    return EXIT_INTERRUPTED if stop.is_set() and rc == 0 else rc


def _live(console: Any, view: DemoView, records: queue.SimpleQueue, worker: threading.Thread,
          stop: threading.Event) -> None:
    from rich.live import Live

    def frame() -> Any:
        return view.render(console.width, console.height)

    with Live(frame(), console=console, auto_refresh=False, transient=False,
              redirect_stdout=False, redirect_stderr=False, vertical_overflow="crop") as live:
        last = 0.0
        while worker.is_alive() or not records.empty():
            try:
                view.apply(records.get(timeout=0.1))
                while not records.empty() and time.monotonic() - last < 0.25:
                    view.apply(records.get_nowait())
            except queue.Empty:
                pass
            if stop.is_set() and not view.finished:
                view.finished = True
                view.note(view.t, "stopping: tearing the simulated site down...", "bold yellow")
            if time.monotonic() - last >= 0.25:
                live.update(frame(), refresh=True)
                last = time.monotonic()
        live.update(frame(), refresh=True)


@click.command("demo")
@click.option("--scenario", default="demo-day", show_default=True,
              help="a scenario file, or the name of a shipped one (demo-day, smoke)")
@click.option("--duration", default=None,
              help="run this long instead (e.g. 45, 45s, 2m); later events are left out")
@click.option("--no-ui", is_flag=True, help="log lines instead of the live view (CI, logs)")
@click.option("--site", default=None, type=click.Path(dir_okay=False),
              help=f"site file [default: {DEFAULT_SITE}]")
@click.option("--record", default=None, type=click.Path(dir_okay=False),
              help="where to keep the record (JSON lines) [default: a temp file]")
def demo(scenario: str, duration: str | None, no_ui: bool, site: str | None,
         record: str | None) -> None:
    """A simulated commune's day in about two minutes: the real daemon, live."""
    from rich.console import Console

    from controller.config import load_site
    from controller.yamlsrc import YamlError
    from device_drivers.sim.scenario import (
        SCENARIO_DIR,
        load_scenario,
        parse_duration,
        resolve_scenario,
        shipped_scenarios,
    )

    site_path = Path(site) if site else DEFAULT_SITE
    if not site_path.is_file():
        click.echo(f"site file not found: {site_path}", err=True)
        sys.exit(EXIT_INVALID)
    sc_path = resolve_scenario(scenario)
    if not sc_path.is_file() and (SCENARIO_DIR / f"{scenario}.yaml").is_file():
        sc_path = SCENARIO_DIR / f"{scenario}.yaml"      # a same-named directory in the cwd
    if not sc_path.is_file():
        click.echo(f"scenario not found: {scenario} (shipped: {', '.join(shipped_scenarios())})",
                   err=True)
        sys.exit(EXIT_INVALID)
    try:
        cfg = load_site(site_path)
        sc = load_scenario(sc_path, cfg)
        secs = parse_duration(duration) if duration is not None else sc.duration
    except YamlError as e:
        for line in e.errors:
            click.echo(line, err=True)
        click.echo(f"{len(e.errors)} problem(s); the demo did not run.", err=True)
        sys.exit(EXIT_INVALID)
    except ValueError as e:
        click.echo(f"--duration {duration}: {e}", err=True)
        sys.exit(EXIT_INVALID)
    tmp = Path(tempfile.mkdtemp(prefix="loaxa-demo-"))
    rec = Path(record) if record else Path(tempfile.gettempdir()) / time.strftime(
        "loaxa-demo-%Y%m%d-%H%M%S.jsonl")
    console = Console()
    ui = not no_ui and console.is_terminal and not console.is_dumb_terminal
    if not no_ui and not ui:
        click.echo("(not an interactive terminal, or TERM=dumb: log lines instead of the live view)")
    logf = _route_logs(rec.with_name(rec.stem + ".demo.log") if ui else None)
    t0 = time.monotonic()
    try:
        if duration is not None:
            sc_path = trimmed_scenario(sc_path, secs, tmp)
        rc = run_demo(site_path, sc_path, rec, ui=ui, console=console, zones=_zones(cfg),
                      title=sc.title or sc_path.stem, duration=secs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if logf is not None:
            with contextlib.suppress(Exception):
                logf.close()
                if not Path(logf.name).stat().st_size:
                    Path(logf.name).unlink()
    wall = time.monotonic() - t0
    if rec.is_file() and rc in (0, EXIT_INTERRUPTED):
        from controller.demo_view import summarise
        from device_drivers.sim.record import read_record

        for line in summarise(read_record(rec)).lines(min(console.width, 80)):
            click.echo(line)
    click.echo(f"record: {rec}  (daemon log: {rec.with_name(rec.stem + '.daemon.log')})")
    click.echo(f"wall time {wall:.1f} s; exit {rc}")
    sys.exit(rc)
