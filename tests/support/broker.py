"""A real mosquitto on a free loopback port, stoppable and restartable (outage injection)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """One broker process; `stop()` simulates an outage, `start()` ends it on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = ""):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None
        self.conf = self.workdir / f"mosquitto-{self.port}.conf"
        self.log = self.workdir / f"mosquitto-{self.port}.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def write_conf(self) -> None:
        base = (
            f"listener {self.port} 127.0.0.1\n"
            "persistence false\n"
            "log_dest stderr\n"
        )
        if os.geteuid() == 0 and "user " not in self.extra_conf:  # as root mosquitto drops to its own user
            base += "user root\n"
        if "allow_anonymous" not in self.extra_conf:
            base += "allow_anonymous true\n"
        self.conf.write_text(base + self.extra_conf)

    def start(self, timeout: float = 5.0) -> Mosquitto:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.write_conf()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
