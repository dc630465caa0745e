"""A NOTIFY_SOCKET the test owns, to read what the daemon tells systemd."""
from __future__ import annotations

import socket
import time
from pathlib import Path


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def poll(self, timeout: float = 0.2) -> list[str]:
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                got.append(line)
        self.messages.extend(got)
        return got

    def wait_for(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        seen = len(self.messages)
        while time.monotonic() < deadline:
            self.poll(0.1)
            for m in self.messages[seen:]:
                if m.startswith(prefix):
                    return m
        raise AssertionError(f"no {prefix!r} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
