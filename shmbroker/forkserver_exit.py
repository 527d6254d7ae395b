"""Loaded into the workers' fork server (a preload module): when it ends, it removes the temporary directory of its socket.

``multiprocessing`` puts the fork server's socket in a ``/tmp/pymp-*``
directory of the process that started it (the driver), which removes it at
its exit; a driver killed with ``kill -9`` cannot. The fork server outlives
the driver until the driver's workers are gone, then exits: this removes the
directory then. A process that is not a fork server (one that started one,
or never did) removes nothing here.
"""

from __future__ import annotations

import atexit
import multiprocessing.forkserver
import os
import shutil

__all__: list[str] = []


def _remove_socket_dir() -> None:
    server = multiprocessing.forkserver._forkserver
    address = getattr(server, "_forkserver_address", None)
    if getattr(server, "_forkserver_pid", None) is not None or not isinstance(address, str):
        return  # a process that started a fork server (it cleans up itself), or none ran here
    directory = os.path.dirname(address)
    if os.path.basename(directory).startswith("pymp-"):
        shutil.rmtree(directory, ignore_errors=True)


atexit.register(_remove_socket_dir)
