"""The MCP example end to end: the records server behind tessera's middleware, and agents with
different policies calling it (the Python agent, and the TypeScript one with the MCP TS SDK).
Each agent gets exactly the tools its scopes allow; revoking one stops it on its next call."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, unique

EXAMPLE = ROOT / "agent-sdk/python/examples/mcp"
TS = ROOT / "agent-sdk/typescript"


@pytest.fixture
def records(daemon, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE / "server.py"), "--port", str(port), "--dpop-only"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(f"{url}/mcp").status_code == 401:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError((tmp_path / "server.log").read_text())
        time.sleep(0.1)
    policy = f'audiences = ["{url}"]\nrequire_binding = true\n'
    reader, admin = unique("mcp-reader"), unique("mcp-admin")
    daemon.enrol(reader, policy + 'scopes = ["read"]')
    daemon.enrol(admin, policy + 'scopes = ["read", "admin"]')
    yield {"url": f"{url}/mcp", "reader": reader, "admin": admin}
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def python_agent(url: str, agent: str, tool: str, args: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLE / "agent.py"), url, tool, json.dumps(args), "--agent", agent],
        capture_output=True,
        text=True,
        timeout=60,
    )


def node_agent(url: str, agent: str, tool: str, args: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", str(TS / "examples/mcp/client.mjs"), url, tool, json.dumps(args), "--agent", agent],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TS,
    )


@pytest.mark.parametrize("run", [python_agent, node_agent], ids=["python", "typescript"])
def test_each_agent_gets_exactly_its_tools(daemon, records, run):
    if run is node_agent and not (TS / "node_modules").is_dir():
        pytest.fail(f"{TS}/node_modules missing: run scripts/setup (npm ci)")
    url, reader, admin = records["url"], records["reader"], records["admin"]

    ok = run(url, reader, "search", {"query": "revenue"})
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["agent"].endswith(f"/agent/{reader}") and out["hits"] == ["r1", "r3"]

    no = run(url, reader, "delete_record", {"record_id": "r2"})
    assert no.returncode == 1 and "lacks scope 'admin'" in no.stderr, no.stderr

    yes = run(url, admin, "delete_record", {"record_id": "r2"})
    assert yes.returncode == 0, yes.stderr
    assert json.loads(yes.stdout)["agent"].endswith(f"/agent/{admin}")

    daemon.revoke(admin)
    gone = run(url, admin, "search", {"query": "revenue"})
    assert gone.returncode == 1 and "revoked" in gone.stderr.lower(), gone.stderr
    # The other agent is untouched.
    assert run(url, reader, "search", {"query": "incident"}).returncode == 0


def test_requests_without_an_agent_token_never_reach_the_tools(records):
    r = httpx.post(
        records["url"],
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"accept": "application/json, text/event-stream"},
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("DPoP ")
