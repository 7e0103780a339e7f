"""The metrics endpoint read by the Prometheus project's own parser (prometheus_client).

Input (stdin, JSON): {"text": <the scrape body>}.
Prints {"ok": true, "samples": [[name, labels, value], ...], "families": {name: type}} or exits 1
with {"ok": false, "error"}: a body the parser refuses is a failure.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def check(req: dict) -> dict:
    samples, families = [], {}
    for fam in text_string_to_metric_families(req["text"]):
        families[fam.name] = fam.type
        for s in fam.samples:
            samples.append([s.name, s.labels, s.value])
    return {"ok": True, "samples": samples, "families": families}


if __name__ == "__main__":
    try:
        print(json.dumps(check(json.load(sys.stdin))))
    except Exception as e:  # noqa: BLE001 - any failure is a refusal
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
