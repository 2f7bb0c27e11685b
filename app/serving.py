"""What each web process of `rlhf serve --workers N` runs (uvicorn starts them afresh)."""

import logging
import socket

from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from app.config import get_settings
from app.logs import configure_logging
from app.main import create_app


def web_app() -> FastAPI:
    """The app of one web process; a fresh interpreter, so logging is set up here."""
    configure_logging(get_settings().log_level)
    # As access_log=False does for one process: app.access logs each request.
    logging.getLogger("uvicorn.access").propagate = False
    return create_app()


class NoDelayHTTPProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol with TCP_NODELAY on every connection. With several
    processes uvicorn binds the socket itself without naming TCP, so asyncio leaves
    Nagle's algorithm on and each response waited ~40 ms for the client's delayed
    ACK (with one process asyncio binds the socket and sets TCP_NODELAY itself)."""

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
