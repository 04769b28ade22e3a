"""Picking a free TCP port: one helper for the MLflow server, the local Ray cluster, the
driver's dashboard and the tests' gloo groups (a leaf module: the standard library only)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at ``host`` right now (the OS picks it).

    The port is free when this returns, not reserved: a caller that binds it later must
    be ready for another process to have taken it in between (and pick again).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
