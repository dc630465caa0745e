"""Site files for daemon tests: real example config, endpoints pointed at test parts."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def site_file(tmp_path: Path, *, base: str = "minimal.yaml", broker_url: str = "mqtt://127.0.0.1:9",
              state_dir: Path | None = None, tx_port: str | None = None, overrides: dict | None = None) -> Path:
    """Copy an example site with only the connection endpoints changed (as simulation.md says)."""
    data = yaml.safe_load((ROOT / "config" / base).read_text())
    data["central"] = {**{k: v for k, v in data["central"].items()
                          if k not in ("password_file", "ca_file", "cert_file", "key_file", "username")},
                       "broker": broker_url}
    data.setdefault("storage", {})["state_dir"] = str(state_dir or tmp_path / "state")
    data["transmitter"]["port"] = tx_port or str(tmp_path / "no-such-tty")
    if data["transmitter"].get("rds"):
        data["transmitter"]["rds"]["port"] = str(tmp_path / "no-such-rds-tty")
    if data.get("lightning_sensor"):
        data["lightning_sensor"]["port"] = str(tmp_path / "no-such-lightning-tty")
    data["control"] = {"socket": str(tmp_path / "control.sock"), "group": None}
    data.setdefault("media_server", {})["port"] = 0
    data["media_server"]["bind"] = "127.0.0.1"
    for k, v in (overrides or {}).items():
        data[k] = v
    out = tmp_path / "site.yaml"
    out.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return out
