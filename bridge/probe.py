"""`python -m bridge.probe [--ready]`: the health check of the image and compose.

It asks the running bridge (at BRIDGE_METRICS_ADDR, read from the same environment
the bridge has) and exits 0 for healthy, 1 for unhealthy, with one line saying why.

Healthy (the default) means: every thread makes progress (`/livez`) and the stream
is authenticated. Deliberately not the broker: during a broker outage the bridge is
doing its job, spooling to disk, and an orchestrator that restarted it would drop the
stream and lose what is sent meanwhile; a stream that stays away is different, a
restart there loses nothing and may help. `--ready` asks `/readyz` instead (stream
and broker), for whoever wants exactly that.

With BRIDGE_METRICS_ADDR empty there is nothing to ask: it says so and exits 0, since
a check that always failed would get a working bridge killed. With port 0 it reads
the port the bridge wrote beside its spool.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from bridge import config
from bridge.errors import BridgeError

TIMEOUT = 4.0


def ask(base: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + path, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def check(ready: bool) -> tuple[bool, str]:
    try:
        address = config.probe_address()
    except BridgeError as exc:
        return False, str(exc)
    if address is None:
        return True, "the metrics and health listener is off (BRIDGE_METRICS_ADDR empty)"
    host, port = address
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        if ready:
            status, body = ask(base, "/readyz")
            return status == 200, json.dumps(body.get("failing", "ready"))
        status, body = ask(base, "/livez")
        if status != 200:
            return False, "stuck: " + json.dumps(body.get("failing", body))
        status, body = ask(base, "/readyz")
        stream = body.get("failing", {}).get("stream")
        return stream is None, stream or "live, stream authenticated"
    except (OSError, ValueError) as exc:
        return False, f"cannot ask {base}: {exc}"


def main(argv: list[str]) -> int:
    ok, why = check(ready="--ready" in argv)
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
