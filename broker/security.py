"""Transport security: loopback-only TCP by default, ZeroMQ CURVE for endpoints reachable from elsewhere.

Certificates are the files ``zmq.auth.create_certificates`` writes (``NAME.key``
with the public key, ``NAME.key_secret`` with both). The broker loads its
secret certificate and accepts only clients whose public certificates lie in
the ``authorized`` directory; a client loads its own secret certificate and
the broker's public one. Generate them with ``shmbroker keys DIR``.
"""

from __future__ import annotations

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import BrokerError

__all__ = ["LOOPBACK", "is_loopback", "check_bind", "secure_server", "secure_client"]

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def is_loopback(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True  # ipc: a file in a 0700 directory
    host = endpoint[6:].rsplit(":", 1)[0]
    return host in LOOPBACK or host.startswith("127.")


def check_bind(endpoint: str, curve: bool) -> None:
    """Refuse a TCP endpoint reachable from other hosts unless CURVE protects it."""
    if not is_loopback(endpoint) and not curve:
        raise BrokerError(f"refusing to bind {endpoint} without authentication: set broker.allow_remote "
                          f"and broker.curve (server_secret, authorized) or use 127.0.0.1")


def _load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise BrokerError(f"cannot read CURVE certificate {path}: {e}") from None
    if secret and sec is None:
        raise BrokerError(f"{path} holds no secret key; give the .key_secret file")
    return public, sec


def secure_server(ctx: zmq.Context, sock: zmq.Socket, secret_file: str, authorized: str) -> ThreadAuthenticator:
    """Make ``sock`` a CURVE server accepting only the public keys in ``authorized``."""
    public, secret = _load(secret_file, secret=True)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=authorized)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, server_public_file: str, secret_file: str) -> None:
    """Make ``sock`` a CURVE client of the broker whose public certificate is given."""
    server_public, _ = _load(server_public_file, secret=False)
    public, secret = _load(secret_file, secret=True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
