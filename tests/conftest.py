"""Fixtures every test may use: real broker, pty serial pairs, ALSA capture env, notify socket, keys."""
from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.audio import capture_env  # noqa: E402
from support.broker import Mosquitto  # noqa: E402
from support.notify import NotifySocket  # noqa: E402
from support.serialpair import PtyPair  # noqa: E402


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.kill()


@pytest.fixture
def pty_pair():
    p = PtyPair()
    yield p
    p.close()


@pytest.fixture
def audio_env(tmp_path):
    """(env, raw_path): pass env to a subprocess; its default audio device writes raw S16_LE mono 48 kHz."""
    return capture_env(tmp_path / "audio")


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def ed25519_keypair():
    """(private_key, public_key_b64) as the central server would hold them."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    priv = Ed25519PrivateKey.generate()
    pub = priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return priv, base64.b64encode(pub).decode()
