"""An agent (MCP client) calling the records server with its tessera identity.

    python agent.py http://127.0.0.1:8765/mcp search '{"query": "revenue"}' [--agent NAME]

Prints the tool's result as JSON; exits 1 with the reason when the call is refused (the tool
needs a scope the agent lacks, or the daemon refuses: revoked, suspended, not enrolled).
"""

from __future__ import annotations

import argparse
import json
import sys

import anyio
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tessera_agent import TesseraError
from tessera_agent.httpx2_auth import TesseraAuth


async def call(url: str, tool: str, arguments: dict, agent: str | None) -> dict:
    # The one line that gives the agent its identity: every HTTP request of the MCP session
    # carries a token for the server's origin (and a DPoP proof when the policy binds tokens).
    auth = TesseraAuth(agent=agent)
    async with create_mcp_http_client(auth=auth) as http:
        async with streamable_http_client(url, http_client=http) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                result = await session.call_tool(tool, arguments)
    text = "".join(getattr(c, "text", "") for c in result.content)
    if result.is_error:
        raise RuntimeError(f"tool {tool} failed: {text}")
    return result.structured_content or json.loads(text)


def _cause(e: BaseException) -> BaseException:
    """The error that matters inside anyio's exception groups (a daemon refusal first)."""
    subs = getattr(e, "exceptions", None)
    if not subs:
        return e
    found = [_cause(s) for s in subs]
    return next((f for f in found if isinstance(f, TesseraError)), found[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("tool")
    p.add_argument("arguments", nargs="?", default="{}")
    p.add_argument("--agent", help="which agent, when this process matches several")
    args = p.parse_args()
    try:
        out = anyio.run(call, args.url, args.tool, json.loads(args.arguments), args.agent)
    except Exception as e:  # noqa: BLE001 - an example reports any failure and exits 1
        cause = _cause(e)
        if isinstance(cause, TesseraError):
            print(f"refused by tesserad: {cause!r}", file=sys.stderr)
        else:
            print(f"call failed: {cause}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
