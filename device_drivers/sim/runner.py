"""`loaxa simulate`: run the real daemon against a simulated site and record what happens.

The harness owns every process it starts (its mosquitto, the daemon) in their own process
groups and kills them in finally-blocks, so Ctrl-C, an exception or a failed start leaves
nothing behind. The site file is used as written except for the connection endpoints
(simulation.md, "What the runner changes in the site file") and the scenario's timing.

Exit codes: 0 the scenario ran to its end (whatever the daemon did), 2 the scenario or
site file is invalid, 1 the harness itself failed, 130 interrupted.
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import structlog
import yaml

from controller.yamlsrc import YamlError
from device_drivers.sim.broker import Broker, die_with_parent, free_port
from device_drivers.sim.record import Recorder
from device_drivers.sim.scenario import Event, Scenario, load_scenario, resolve_scenario

log = structlog.get_logger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXIT_OK, EXIT_HARNESS, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
DAEMON_STOP_S = 5.0
ONLINE_WAIT_S = 30.0

ASOUND_CONF = """pcm.!default {
    type plug
    slave {
        pcm {
            type file
            slave.pcm { type null }
            file { @func getenv vars [ LOAXA_AUDIO_CAPTURE ] default "/tmp/loaxa-air.raw" }
            format "raw"
        }
        format S16_LE
        rate %(rate)d
        channels 1
    }
}
"""


class HarnessError(Exception):
    """The simulation itself could not run (not the daemon's fault, not the input's)."""


class InvalidInput(Exception):
    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


# ---------------------------------------------------------------------- site rewrite
def rewrite_site(site_path: Path, out: Path, *, broker_url: str, ports: dict[str, str],
                 state_dir: Path, control_socket: Path, media_port: int,
                 public_key_b64: str, key_id: str, timing: dict[str, float]) -> dict:
    """Copy the site file with only the connection endpoints (and the scenario's timing)
    changed; relative paths are made absolute against the original file's directory so
    they still name the same files from the work dir."""
    data = yaml.safe_load(site_path.read_text(encoding="utf-8"))
    base = site_path.resolve().parent
    c = data["central"]
    for k in ("username", "password_file", "ca_file", "cert_file", "key_file"):
        c.pop(k, None)
    c["broker"] = broker_url
    c["keys"] = [{"key_id": key_id, "public_key": public_key_b64}]
    cm = data.get("clusters_mqtt") or {}
    for k in ("username", "password_file", "ca_file"):
        cm.pop(k, None)
    cm["broker"] = broker_url
    data["clusters_mqtt"] = cm
    tx = data["transmitter"]
    tx["port"] = ports["transmitter"]
    if tx.get("rds") and "rds" in ports:
        tx["rds"]["port"] = ports["rds"]
    if data.get("lightning_sensor") and "lightning" in ports:
        data["lightning_sensor"]["port"] = ports["lightning"]
    audio = data.get("audio") or {}
    audio["device"] = None
    for k in ("safe_file",):
        if audio.get(k):
            audio[k] = str((base / audio[k]).resolve())
    data["audio"] = audio
    data["storage"] = {**(data.get("storage") or {}), "state_dir": str(state_dir)}
    data["control"] = {"socket": str(control_socket), "group": None}
    data["media_server"] = {**(data.get("media_server") or {}), "bind": "127.0.0.1",
                            "port": media_port, "public_url": f"http://127.0.0.1:{media_port}"}
    for p in data.get("programmes") or []:
        media = ((p.get("source") or {}).get("media")) or {}
        if media.get("path"):
            media["path"] = str((base / media["path"]).resolve())
    # the host's NTP state is an endpoint too: the simulated site's clock is trusted via a
    # flag file in the work dir (present = synchronised), so a dev box without NTP still runs
    # its schedule and a scenario can take the flag away
    flag = state_dir.parent / "clock-synchronised"
    flag.touch()
    data["timing"] = {**(data.get("timing") or {}), "clock_check": f"file:{flag}", **(timing or {})}
    out.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return data


# ---------------------------------------------------------------------- the daemon
class DaemonProc:
    """The real `loaxa run` as a child in its own process group (it may spawn espeak-ng…)."""

    def __init__(self, site_file: Path, workdir: Path, env: dict[str, str]):
        self.site_file, self.workdir, self.env = site_file, workdir, env
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "daemon.log"
        self.starts = 0
        self.pids: list[int] = []

    def start(self) -> int:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controller.cli", "run", "--config", str(self.site_file)],
                env=self.env, cwd=str(self.workdir), stdin=subprocess.DEVNULL,
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)
        self.starts += 1
        self.pids.append(self.proc.pid)
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    async def stop(self, *, hard: bool) -> int | None:
        """SIGKILL the group at once (hard), or SIGTERM and give it DAEMON_STOP_S."""
        p = self.proc
        if p is None:
            return None
        if not hard and p.poll() is None:
            self._signal(signal.SIGTERM)
            deadline = time.monotonic() + DAEMON_STOP_S
            while p.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.kill()
        return p.returncode

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """Last resort, synchronous: the whole group, including stragglers of a dead leader."""
        p = self.proc
        if p is None:
            return
        self._signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            p.wait(5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# ---------------------------------------------------------------------- the run
class Simulation:
    def __init__(self, site: Path, scenario: Path, record: Path, *,
                 on_record: Callable[[dict], Any] | None = None,
                 stop_event: threading.Event | None = None,
                 workdir: Path | None = None, keep_workdir: bool = False):
        self.site_path = Path(site)
        self.scenario_path = resolve_scenario(scenario)
        self.record_path = Path(record)
        self.on_record = on_record
        self.stop_event = stop_event or threading.Event()
        self.keep = keep_workdir or workdir is not None
        self.workdir = Path(workdir) if workdir else None
        self.broker: Broker | None = None
        self.daemon: DaemonProc | None = None
        self.central: Any = None   # CentralSim
        self.sites: Any = None
        self.radio: Any = None
        self.rec: Recorder | None = None
        self.daemon_rc: int | None = None
        self.summary: dict[str, Any] = {}
        self.clock_offset_s = 0.0   # the daemon's wall clock minus the machine's (clock jumps)

    def load(self) -> tuple[Any, Scenario]:
        from controller.config import load_site

        try:
            cfg = load_site(self.site_path)
        except YamlError as e:
            raise InvalidInput(["site file: " + x for x in e.errors]) from None
        try:
            sc = load_scenario(self.scenario_path, cfg)
        except YamlError as e:
            raise InvalidInput(e.errors) from None
        return cfg, sc

    async def run(self) -> int:
        cfg, sc = self.load()
        from device_drivers.sim.central_sim import CentralSim
        from device_drivers.sim.site_sim import SiteSim

        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="loaxa-sim-"))
        wd = self.workdir
        wd.mkdir(parents=True, exist_ok=True)
        self.rec = Recorder(self.record_path, on_record=self.on_record, started=False)
        try:
            self.broker = Broker(wd / "broker")
            try:
                self.broker.start()
            except RuntimeError as e:
                raise HarnessError(str(e)) from None
            self.central = CentralSim(cfg.site.id, self.broker.url, self.rec)
            await asyncio.to_thread(self.central.start)
            if _uses_radio(sc):
                from device_drivers.sim.radio_sim import RadioSim

                self.radio = RadioSim()
                await self.radio.start()
            capture = wd / "air.raw"
            capture.touch()
            timing = sc.timing.site_keys()
            self.sites = SiteSim(cfg, self.broker.url, wd, self.rec, capture_path=capture,
                                 heartbeat_s=timing.get("heartbeat_timeout_s"))
            await self.sites.start()
            site_file = wd / "site.yaml"
            rewrite_site(self.site_path, site_file, broker_url=self.broker.url,
                         ports=self.sites.ports, state_dir=wd / "state",
                         control_socket=wd / "control.sock", media_port=free_port(),
                         public_key_b64=self.central.public_key_b64,
                         key_id=self.central.key_id, timing=timing)
            self.daemon = DaemonProc(site_file, wd, self._daemon_env(cfg, capture, sc))
            return await self._play(cfg, sc)
        finally:
            await self._teardown()

    @property
    def clock_flag(self) -> Path:
        """Present = the gateway's clock is synchronised (rewrite_site points clock_check here)."""
        return self.workdir / "clock-synchronised"

    @property
    def faketime_file(self) -> Path:
        return self.workdir / "faketime.rc"

    def _daemon_env(self, cfg: Any, capture: Path, sc: Scenario) -> dict[str, str]:
        conf = self.workdir / "asound.conf"
        conf.write_text(ASOUND_CONF % {"rate": cfg.audio.sample_rate})
        env = dict(os.environ)
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(k, None)
        env["ALSA_CONFIG_PATH"] = str(conf)
        env["LOAXA_AUDIO_CAPTURE"] = str(capture)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        if sc.jumps_clock:
            # the daemon's wall clock (only) follows an offset in a file it re-reads on every
            # call; CLOCK_MONOTONIC stays true, exactly as when NTP or `date -s` steps the clock
            lib = find_libfaketime()
            self.faketime_file.write_text("+0\n")
            env["LD_PRELOAD"] = " ".join(filter(None, [lib, os.environ.get("LD_PRELOAD")]))
            env["FAKETIME_TIMESTAMP_FILE"] = str(self.faketime_file)
            env["FAKETIME_NO_CACHE"] = "1"
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        return env

    async def _play(self, cfg: Any, sc: Scenario) -> int:
        rec = self.rec
        pid = self.daemon.start()
        # t=0 is when the gateway is online at the central server, so a command at 2 s
        # reaches it even on a slow Pi (the start-up messages are written at t=0)
        deadline = time.monotonic() + ONLINE_WAIT_S
        while (not self.central.gateway_online.is_set() and time.monotonic() < deadline
               and self.daemon.poll() is None and not self.stop_event.is_set()):
            await asyncio.sleep(0.05)
        rec.start_clock({"start": {
            "site": cfg.site.id, "scenario": str(self.scenario_path), "duration": sc.duration,
            "events": len(sc.events), "daemon_pid": pid, "broker": self.broker.url,
            "simulators": self.sites.simulators}})
        pending = sc.ordered()
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                now = rec.now()
                if now >= sc.duration:
                    break
                if self.stop_event.is_set():
                    rec.scenario({"interrupted": {"at": round(now, 3)}})
                    return EXIT_INTERRUPTED
                while pending and pending[0][1].at <= now:
                    idx, ev = pending.pop(0)
                    t = asyncio.create_task(self._apply(idx, ev))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                self._check_daemon(rec)
                if self.daemon_rc == EXIT_INVALID and self.daemon.starts == 1:
                    raise InvalidInput([f"the daemon rejected the rewritten site file "
                                        f"({self.daemon.site_file}):", self.daemon.log_tail()])
                nxt = pending[0][1].at if pending else sc.duration
                await asyncio.sleep(max(0.0, min(0.05, nxt - now, sc.duration - now)))
        finally:
            for t in tasks:
                t.cancel()
        rec.scenario({"end": {"duration": sc.duration, "daemon_running": self.daemon.poll() is None,
                              "daemon_starts": self.daemon.starts}})
        return EXIT_OK

    def _check_daemon(self, rec: Recorder) -> None:
        rc = self.daemon.poll()
        if rc is not None and self.daemon_rc is None and not getattr(self, "_restarting", False):
            self.daemon_rc = rc
            rec.scenario({"daemon_exited": {"rc": rc, "log_tail": self.daemon.log_tail(8)}})

    async def _apply(self, idx: int, ev: Event) -> None:
        """Apply one event; never let a failure end the run (it is recorded instead)."""
        out = ev.as_record()
        out["index"] = idx
        body = ev.body
        try:
            result = await self._dispatch(ev.kind, body, out)
            if result is not None:
                out["result"] = result
        except Exception as e:
            log.exception("scenario.event_failed", kind=ev.kind)
            out["error"] = f"{type(e).__name__}: {e}"
        # gateway_restart / broker_outage record their own lines as they progress
        if ev.kind not in ("gateway_restart", "broker_outage") or "error" in out:
            self.rec.scenario(out)

    async def _dispatch(self, kind: str, b: Any, out: dict) -> Any:
        s = self.sites
        if kind == "lightning":
            sensed = s.strikes(b.strikes, b.distance_km)
            for cid, kinds in b.damage.items():
                for k in kinds:
                    await s.damage(cid, k)
            return {"sensor": "strikes sent" if sensed else "no sensor on this site"}
        if kind == "subscription_expired":
            await s.sim_expire(b.cluster)
            return None
        if kind == "power_cut":
            clusters = s.expand(b.clusters)
            await s.power_cut(clusters, b.duration)
            return {"clusters": clusters}
        if kind == "link_cut":
            await s.link_cut(b.cluster, b.duration)
            return None
        if kind == "transmitter":
            s.transmitter_fault(b.model_dump(exclude_none=True))
            return None
        if kind == "command":
            args = self.radio.substitute(b.args) if self.radio is not None else b.args
            sent = self.central.send(b.name, args, signed=b.signed, request_id=b.request_id,
                                     replay_of=b.replay_of, issued_ago_s=b.issued_ago)
            if args != b.args:
                sent["args"] = args     # as sent, with {sim.radio} filled in
            return sent
        if kind == "broker_outage":
            await self._broker_outage(b.duration, out)
            return None
        if kind == "gateway_restart":
            await self._restart(b.hard, b.down, out)
            return None
        if kind == "clock":
            return self._clock(b)
        raise ValueError(f"unknown event kind {kind}")

    def _clock(self, b: Any) -> dict:
        if b.synced is not None:
            if b.synced:
                self.clock_flag.touch()
            else:
                self.clock_flag.unlink(missing_ok=True)
            return {"flag": str(self.clock_flag), "present": self.clock_flag.exists()}
        self.clock_offset_s += b.jump
        tmp = self.faketime_file.with_suffix(".tmp")   # replaced whole: never read half-written
        tmp.write_text(f"{self.clock_offset_s:+.0f}\n")
        tmp.replace(self.faketime_file)
        return {"daemon_clock_offset_s": self.clock_offset_s}

    async def _broker_outage(self, seconds: float, out: dict) -> None:
        self.broker.kill()
        self.rec.scenario(out)
        await asyncio.sleep(seconds)
        try:
            self.broker.start()
        except RuntimeError as e:
            raise HarnessError(f"broker did not come back: {e}") from None
        self.rec.scenario({"ended": "broker_outage", "index": out["index"]})

    async def _restart(self, hard: bool, down: float, out: dict) -> None:
        self._restarting = True
        try:
            rc = await self.daemon.stop(hard=hard)
            out["result"] = {"stopped_rc": rc}
            self.rec.scenario(out)
            if down:
                await asyncio.sleep(down)
            self.daemon_rc = None
            pid = self.daemon.start()
        finally:
            self._restarting = False
        self.rec.scenario({"ended": "gateway_restart", "index": out["index"], "daemon_pid": pid})

    async def _teardown(self) -> None:
        """Everything off, each step independent of the others; processes first."""
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.summary["daemon_rc"] = await asyncio.wait_for(
                    self.daemon.stop(hard=False), DAEMON_STOP_S + 2)
            self.daemon.kill()
        if self.sites is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sites.stop(), 5)
        if self.central is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(self.central.stop), 3)
        if self.radio is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.radio.stop(), 3)
        if self.broker is not None:
            self.broker.kill()
        if self.daemon is not None:   # next to the record, so a checker can read both
            with contextlib.suppress(OSError):
                shutil.copyfile(self.daemon.log_path, daemon_log_path(self.record_path))
        if self.rec is not None:
            if self.daemon is not None:   # the last line: the file is complete
                self.rec.scenario({"finished": {"daemon_rc": self.summary.get("daemon_rc")}})
            self.summary["records"] = self.rec.count
            self.rec.close()

    def kill_all(self) -> None:
        """Synchronous last resort when the loop itself died."""
        if self.daemon is not None:
            self.daemon.kill()
        if self.broker is not None:
            self.broker.kill()

    def cleanup_workdir(self) -> None:
        if self.workdir is not None and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def daemon_log_path(record: Path) -> Path:
    """The daemon's own log of a run, kept beside its record: OUT.jsonl -> OUT.daemon.log."""
    return record.with_name(record.stem + ".daemon.log")


def find_libfaketime() -> str:
    """The libfaketime preload (Debian/Raspberry Pi OS package `libfaketime`), wherever the
    distribution put it; clock jumps cannot be simulated without it."""
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1", "/usr/lib64/faketime/libfaketime.so.1"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    raise HarnessError("a clock jump needs libfaketime (apt install libfaketime); "
                       "libfaketime.so.1 not found under /usr/lib")


def _uses_radio(sc: Scenario) -> bool:
    from device_drivers.sim.radio_sim import PLACEHOLDER

    return any(e.command is not None and PLACEHOLDER in str(e.command.args) for e in sc.events)


def run_scenario(site: str | Path, scenario: str | Path, record: str | Path, *,
                 on_record: Callable[[dict], Any] | None = None,
                 stop_event: threading.Event | None = None,
                 report: Callable[[str], Any] | None = None,
                 workdir: str | Path | None = None, keep_workdir: bool = False) -> int:
    """Run one scenario to its end; the library entry point behind `loaxa simulate`/`demo`.

    `on_record(obj)` sees each record line as it is written (from the runner's threads:
    keep it quick, hand off to your own loop/queue). Setting `stop_event` ends the run
    early (exit 130) with everything torn down. `report(text)` receives the messages a
    person should read (invalid input, harness failure); default: the log.
    Returns 0 / 1 (harness failed) / 2 (invalid scenario or site) / 130 (stopped).
    """
    say = report or (lambda text: log.error("simulate", message=text))
    sim = Simulation(Path(site), Path(scenario), Path(record), on_record=on_record,
                     stop_event=stop_event, workdir=Path(workdir) if workdir else None,
                     keep_workdir=keep_workdir)
    try:
        return _run_loop(sim)
    except InvalidInput as e:
        for line in e.errors:
            say(line)
        say(f"{len(e.errors)} problem(s); the simulation did not run.")
        return EXIT_INVALID
    except HarnessError as e:
        say(f"simulation harness failed: {e}")
        return EXIT_HARNESS
    except KeyboardInterrupt:
        say("interrupted; everything stopped.")
        return EXIT_INTERRUPTED
    except Exception as e:
        log.exception("simulate.failed")
        say(f"simulation harness failed: {type(e).__name__}: {e}")
        if sim.daemon is not None:
            say("daemon log tail:\n" + sim.daemon.log_tail())
        return EXIT_HARNESS
    finally:
        sim.kill_all()
        if sim.workdir is not None and sim.keep:
            say(f"work dir kept: {sim.workdir}")
        sim.cleanup_workdir()


def _run_loop(sim: Simulation) -> int:
    """asyncio.run; when we own the main thread, SIGTERM and a first Ctrl-C end the run
    cleanly (an `interrupted` record line, everything torn down); a second Ctrl-C raises."""
    main_thread = threading.current_thread() is threading.main_thread()
    old: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and sim.stop_event.is_set():
            raise KeyboardInterrupt
        sim.stop_event.set()
    if main_thread:
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, on_signal)
    try:
        return asyncio.run(sim.run())
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@click.command("simulate")
@click.option("--site", required=True, type=click.Path(dir_okay=False),
              help="site file, e.g. config/binhlu.yaml (used as written, endpoints aside)")
@click.option("--scenario", required=True,
              help="scenario file, or the name of a shipped one (smoke, demo-day)")
@click.option("--record", required=True, type=click.Path(dir_okay=False),
              help="JSON-lines record to write (tail it while it runs)")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="keep the run's files (daemon log, rewritten site file) here")
def simulate_cmd(site: str, scenario: str, record: str, workdir: str | None) -> None:
    """Run the real daemon against a simulated site, scripted by a scenario."""
    from controller import logs

    logs.setup("warning")
    t0 = time.monotonic()
    rc = run_scenario(site, scenario, record, workdir=workdir,
                      report=lambda text: click.echo(text, err=True))
    if rc == EXIT_OK:
        click.echo(f"scenario ran to its end in {time.monotonic() - t0:.1f} s; record: {record}",
                   err=True)
    sys.exit(rc)


if __name__ == "__main__":
    simulate_cmd()
