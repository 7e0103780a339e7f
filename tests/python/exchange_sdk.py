"""The Python SDK's exchange against the federation test's authorization server, as the agent
(this process's uid matches the agent's selectors). Input JSON: socket, endpoint, claude, ca.
Prints what each exchange got."""

import json
import ssl
import sys

from tessera_agent import Client, ExchangeError, Exchanger

a = json.load(sys.stdin)
ctx = ssl.create_default_context(cafile=a["ca"])
client = Client(a["socket"])
x = Exchanger(a["endpoint"], client=client, verify=ctx)
first = x.access_token()
second = x.access_token()
te = Exchanger(a["endpoint"], grant="token-exchange", params={"audience": "https://rs.example"}, client=client, verify=ctx)
claude = Exchanger.anthropic("fdrl_01", "org-1", "svac_01", token_endpoint=a["claude"], client=client, verify=ctx)
try:
    Exchanger(a["endpoint"], audience="https://api.anthropic.com/other", client=client, verify=ctx).exchange()
    refused = None
except ExchangeError as e:
    refused = e.error
except Exception as e:  # the daemon's refusal (audience not allowed)
    refused = type(e).__name__
print(json.dumps({
    "first": first.access_token,
    "second": second.access_token,
    "subject": first.response.get("subject"),
    "expires_at": first.expires_at,
    "token_exchange": te.exchange().response.get("issued_token_type"),
    "claude": claude.exchange().response.get("subject"),
    "refused": refused,
}))
