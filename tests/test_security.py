"""Security: loopback-only TCP unless authenticated; CURVE refuses a client without the key."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import zmq.auth

from broker import Broker, BrokerError, BrokerTimeout, Client
from shmbroker.config import BrokerConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(tmp_path, "broker")
    client_pub, client_sec = zmq.auth.create_certificates(tmp_path, "client")
    _intruder_pub, intruder_sec = zmq.auth.create_certificates(tmp_path, "intruder")
    (authorized / "client.key").write_bytes(Path(client_pub).read_bytes())
    return {"server_pub": server_pub, "server_sec": server_sec, "client_sec": client_sec,
            "intruder_sec": intruder_sec, "authorized": str(authorized)}


def test_curve_accepts_the_key_and_refuses_others(keys: dict[str, str]) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Broker(capacity=8 * 2**20, endpoint=endpoint,
                curve={"secret": keys["server_sec"], "authorized": keys["authorized"]}) as b:
        assert b.endpoint == endpoint
        with Client(endpoint, curve=(keys["server_pub"], keys["client_sec"])) as c:
            h = c.put(np.arange(10))
            assert c.get(h).sum() == 45
            with pytest.raises(BrokerTimeout):
                Client(endpoint, curve=(keys["server_pub"], keys["intruder_sec"]), timeout=1.5)
            with pytest.raises(BrokerTimeout):
                Client(endpoint, timeout=1.5)  # no key at all
            assert c.get(h).sum() == 45  # the broker kept serving its authorized client
            assert c.stats()["clients"] == 1


def test_non_loopback_tcp_is_refused_without_curve() -> None:
    with pytest.raises(BrokerError, match="without authentication"):
        Broker(capacity=4 * 2**20, endpoint=f"tcp://0.0.0.0:{free_port()}", startup_timeout=30)


def test_config_requires_curve_for_allow_remote() -> None:
    with pytest.raises(ValueError, match="not loopback"):
        BrokerConfig.model_validate({"endpoint": "tcp://0.0.0.0:5555"})
    with pytest.raises(ValueError, match="needs curve keys"):
        BrokerConfig.model_validate({"endpoint": "tcp://0.0.0.0:5555", "allow_remote": True})


def test_runtime_dir_and_sockets_are_private() -> None:
    with Broker(capacity=4 * 2**20) as b:
        rundir = Path(b.info["fd_path"]).parent
        assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
        assert stat.S_IMODE(Path(b.info["fd_path"]).stat().st_mode) == 0o600


def test_a_silent_descriptor_request_does_not_stall_the_broker() -> None:
    import time

    with Broker(capacity=4 * 2**20) as b, Client(b.endpoint) as c:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(b.info["fd_path"])  # connects, never sends its key
        try:
            t = time.perf_counter()
            for _ in range(5):
                c.ping()
            assert time.perf_counter() - t < 0.5
            with Client(b.endpoint) as c2:  # a real client still gets the arena meanwhile
                assert c2.get(c.put(np.ones(3))).sum() == 3
        finally:
            silent.close()
