"""`loaxa central keygen|send|watch`: the reference central client for the central team."""
from __future__ import annotations

import json
import sys
import time

import click


@click.group("central")
def central() -> None:
    """Act as the central server: make keys, send signed commands, watch a site."""


@central.command("keygen")
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(file_okay=False))
@click.option("--name", default="central", show_default=True)
@click.option("--key-id", default=None, help="key_id to print in the site-file snippet (default: NAME)")
def keygen_cmd(out_dir: str, name: str, key_id: str | None) -> None:
    """Write NAME.key (private, 0600) and NAME.pub; print the site-file snippet."""
    from controller.central import keygen

    path, pub = keygen(out_dir, name)
    click.echo(f"private key: {path} (keep it on the central server only)")
    click.echo("add to the site file under central.keys:")
    click.echo(f"  - key_id: {key_id or name}\n    public_key: \"{pub}\"")


def _broker_opts(f):
    for opt in reversed([
        click.option("--broker", required=True, help="mqtt://host:1883 or mqtts://host:8883"),
        click.option("--site", "site_id", required=True, help="site id, e.g. binhlu"),
        click.option("--protocol", type=click.Choice(["5", "3.1.1"]), default="5", show_default=True),
        click.option("--username", default=None),
        click.option("--password-file", type=click.Path(dir_okay=False), default=None),
        click.option("--ca-file", type=click.Path(dir_okay=False), default=None),
    ]):
        f = opt(f)
    return f


def _client(broker, site_id, protocol, username, password_file, ca_file, key=None):
    from controller.central import CentralClient
    from controller.config import read_secret

    return CentralClient(broker, site_id, protocol=protocol, username=username,
                         password=read_secret(password_file) if password_file else None,
                         ca_file=ca_file, key=key)


@central.command("send")
@_broker_opts
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--key-id", required=True)
@click.option("--timeout", default=15.0, show_default=True)
@click.argument("command")
@click.argument("args", required=False, default="{}")
def send_cmd(broker, site_id, protocol, username, password_file, ca_file, key_file, key_id, timeout,
             command, args) -> None:
    """Sign COMMAND with ARGS (JSON) and print the site's response.

    Example: loaxa central send --broker mqtt://127.0.0.1 --site binhlu --key central.key
    --key-id laichau-2026 broadcast.start '{"priority":"emergency","source":{"tts":{"text":"Bão"}},"targets":"all"}'
    """
    from controller.central import SigningKey

    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"ARGS is not JSON: {e}") from None
    key = SigningKey.from_file(key_file, key_id)
    with _client(broker, site_id, protocol, username, password_file, ca_file, key) as c:
        try:
            resp = c.send(command, parsed, timeout=timeout)
        except TimeoutError as e:
            click.echo(f"no answer: {e} (is the gateway online? see its retained status)", err=True)
            sys.exit(3)
    click.echo(json.dumps(resp, ensure_ascii=False, indent=2))
    sys.exit(0 if resp.get("status") == "ok" else 1)


@central.command("watch")
@_broker_opts
@click.option("--duration", type=float, default=None, help="stop after N seconds")
@click.option("--json", "as_json", is_flag=True, help="one JSON line per message")
def watch_cmd(broker, site_id, protocol, username, password_file, ca_file, duration, as_json) -> None:
    """Live view of a site's status, alarms and events; reports seq gaps and duplicates."""
    def show(o) -> None:
        if as_json:
            click.echo(json.dumps({"kind": o.kind, "topic": o.topic, "payload": o.payload,
                                   "detail": o.detail}, ensure_ascii=False, default=str))
            return
        p = o.payload if isinstance(o.payload, dict) else {}
        ts = time.strftime("%H:%M:%S")
        if o.kind == "event":
            extra = {k: p[k] for k in ("programme_id", "code", "cluster_id", "cause", "reason") if k in p}
            click.echo(f"{ts} #{p.get('seq')} {p.get('type')}{' (historical)' if p.get('historical') else ''} {extra or ''}")
        elif o.kind in ("gap", "duplicate", "seq_regression", "gap_filled"):
            click.echo(f"{ts} !! {o.kind}: {o.detail}")
        elif o.kind == "status":
            click.echo(f"{ts} status {p.get('state')} session {p.get('session')}")
        elif o.kind == "alarms":
            click.echo(f"{ts} active alarms: {len(o.payload or [])}")
        elif o.kind == "health":
            c = p.get("counts", {})
            click.echo(f"{ts} health: {c.get('online')} online, {c.get('offline')} offline, "
                       f"{c.get('unmonitored')} unmonitored, outbox {p.get('gateway', {}).get('outbox_depth')}")

    c = _client(broker, site_id, protocol, username, password_file, ca_file)
    c.connect()
    try:
        c.watch(show)
        deadline = time.monotonic() + duration if duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        c.close()
