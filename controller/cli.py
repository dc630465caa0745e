"""The `loaxa` command: daemon, config checks, profiles, central client, technician tools."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from controller.yamlsrc import YamlError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loaxa")
def main() -> None:
    """loaxa — commune loudspeaker controller (loa xã)."""


@main.command()
@click.option("--config", "-c", "config_path", required=True, type=click.Path(dir_okay=False),
              help="site file, e.g. /etc/loaxa/site.yaml")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
def run(config_path: str, log_level: str | None) -> None:
    """Run the daemon (what systemd starts)."""
    from controller import daemon, logs

    logs.setup(log_level or "info")
    try:
        rc = daemon.main(config_path, log_level)
    except YamlError as e:
        for line in e.errors:
            click.echo(line, err=True)
        click.echo(f"{len(e.errors)} problem(s) in the site file; nothing started.", err=True)
        sys.exit(2)
    sys.exit(rc)


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def check_config(file: str, as_json: bool) -> None:
    """Check a site file: every error with its line, or a short summary."""
    from controller.checkconfig import report

    sys.exit(report(Path(file), as_json=as_json))


@main.group()
def config() -> None:
    """Site file helpers."""


@config.command("schema")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None)
def config_schema(output: str | None) -> None:
    """Print (or write) the JSON Schema of the site file for editors."""
    from controller.checkconfig import schema_text

    text = schema_text()
    if output:
        Path(output).write_text(text)
    else:
        click.echo(text, nl=False)


@main.group()
def profiles() -> None:
    """Firmware profiles (device models)."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True)
def profiles_list(as_json: bool) -> None:
    """List the shipped device profiles."""
    from device_drivers.profiles import list_profiles

    rows = list_profiles()
    if as_json:
        click.echo(json.dumps([list(r) for r in rows], ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("profile", "kind", "vendor", "model", "firmware")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console().print(t)


@profiles.command("check")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
def profiles_check(files: tuple[str, ...]) -> None:
    """Check profile files (all shipped ones when none given)."""
    from device_drivers.profiles import PROFILE_DIR, check_profile

    paths = [Path(f) for f in files] or sorted(PROFILE_DIR.glob("*.yaml"))
    bad = 0
    for p in paths:
        errs = check_profile(p)
        if errs:
            bad += 1
            for e in errs:
                click.echo(e, err=True)
        else:
            click.echo(f"{p}: ok")
    sys.exit(2 if bad else 0)


def _register_plugins() -> None:
    from controller.centralcli import central
    from controller.demo import demo
    from controller.techcli import register
    from device_drivers.sim.runner import simulate_cmd

    register(main)
    main.add_command(central)
    main.add_command(simulate_cmd)
    main.add_command(demo)


_register_plugins()

if __name__ == "__main__":
    main()
