"""httpx2 support (the MCP Python SDK 2.x speaks httpx2): `httpx2.AsyncClient(auth=TesseraAuth())`."""

from __future__ import annotations

import httpx2

from .auth import _Flow


class TesseraAuth(_Flow, httpx2.Auth):
    """The same behaviour as `tessera_agent.TesseraAuth`, for httpx2 clients."""
