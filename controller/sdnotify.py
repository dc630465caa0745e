"""systemd's notify protocol in a few lines (no dependency; systemd-python doesn't build here)."""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET")
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.addr = addr
        self.sock: socket.socket | None = None
        if addr:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> None:
        if not self.sock:
            return
        try:
            self.sock.sendto("\n".join(lines).encode(), self.addr)
        except OSError:
            pass  # systemd gone or socket full: never let notification break the daemon

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC in seconds, if systemd asked for pings (and for us)."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None
