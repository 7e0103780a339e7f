"""An MCP server (streamable HTTP) whose tools each need a scope, enforced from the calling
agent's verified tessera token: `search` needs `read`, `delete_record` needs `admin`.

    python server.py --port 8765            # agents call http://127.0.0.1:8765/mcp

Every HTTP request must carry an agent token for this server's origin (bound tokens with a
fresh DPoP proof, or bearer tokens unless --dpop-only). Keys come from the local tesserad
(`TESSERA_SOCKET`), or from `--jwks-url` when the server runs on another host.
"""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from tessera_agent import InsufficientScope, Verifier
from tessera_agent.asgi import TesseraMiddleware, agent_of

RECORDS = {
    "r1": "quarterly revenue summary",
    "r2": "incident report: disk full on build host",
    "r3": "revenue forecast for next year",
}

mcp = MCPServer("records", instructions="A tiny record store; each tool needs a scope.")


def _agent_with(ctx: Context, scope: str) -> str:
    """The calling agent's SPIFFE ID, once it is known to hold `scope` (else the tool fails)."""
    agent = agent_of(ctx.request_context.request)
    try:
        agent.require(scope)
    except InsufficientScope as e:
        raise ToolError(f"{agent.id} lacks scope {e.needed!r}") from e
    return agent.id


@mcp.tool()
def search(query: str, ctx: Context) -> dict:
    """Records whose text contains `query` (scope `read`)."""
    who = _agent_with(ctx, "read")
    hits = sorted(k for k, v in RECORDS.items() if query.lower() in v.lower())
    return {"agent": who, "hits": hits}


@mcp.tool()
def delete_record(record_id: str, ctx: Context) -> dict:
    """Delete one record (scope `admin`)."""
    who = _agent_with(ctx, "admin")
    existed = RECORDS.pop(record_id, None) is not None
    return {"agent": who, "deleted": record_id, "existed": existed}


def build_app(public_url: str, *, dpop_only: bool = False, jwks_url: str | None = None):
    """The MCP app behind tessera's middleware; `public_url` is the audience agents ask for."""
    verifier = Verifier(public_url, jwks_url=jwks_url, require_dpop=dpop_only)
    return TesseraMiddleware(mcp.streamable_http_app(), verifier, public_url=public_url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--public-url", help="the URL agents use (default http://HOST:PORT)")
    p.add_argument("--dpop-only", action="store_true", help="refuse bearer tokens")
    p.add_argument("--jwks-url", help="agent keys from this JWKS URL instead of the local daemon")
    args = p.parse_args()
    public_url = args.public_url or f"http://{args.host}:{args.port}"
    app = build_app(public_url, dpop_only=args.dpop_only, jwks_url=args.jwks_url)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
