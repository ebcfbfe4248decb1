"""Shared helpers for registry tests: a real uvicorn server on a free loopback port.

Plain context managers rather than fixtures so that any test module (and the lead's
conftest) can build its own fixtures from them without import side effects.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from streams.log.embedded import Durability, EmbeddedLog
from streams.schemas.log_registry import LogRegistry
from streams.schemas.rest import create_registry_app
from streams.topics import Topics

__all__ = ["avro_record", "serve", "served_log_registry"]


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yield its base URL; stop it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def served_log_registry(path: Path) -> Iterator[tuple[str, LogRegistry, EmbeddedLog]]:
    """An :class:`EmbeddedLog` at ``path``, a :class:`LogRegistry` on it and its REST app
    served; yields ``(url, registry, log)`` and closes everything after."""
    log = EmbeddedLog(path, durability=Durability.GROUP)
    try:
        registry = LogRegistry(log, Topics())
        with serve(create_registry_app(registry)) as url:
            yield url, registry, log
    finally:
        log.close()



def avro_record(name: str, *fields: tuple[str, object] | tuple[str, object, object]) -> str:
    """The JSON text of a record schema: ``avro_record("R", ("a", "int"), ("b", "string", ""))``
    (a third element is the field's default)."""
    out = []
    for f in fields:
        field: dict[str, object] = {"name": f[0], "type": f[1]}
        if len(f) == 3:
            field["default"] = f[2]
        out.append(field)
    return json.dumps({"type": "record", "name": name, "fields": out})
