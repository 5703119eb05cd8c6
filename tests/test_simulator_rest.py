"""The simulator's REST side answers as Tutum's did, consistent with the events it sent
(docs/contract.md section 6)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from tests.support.procs import SIM_APIKEY, SIM_USER, simulator_stats
from tests.support.stream_client import read_frames
from tests.support.wait import wait_for

BASIC = "Basic " + base64.b64encode(f"{SIM_USER}:{SIM_APIKEY}".encode()).decode()


def get(sim, path: str, auth: str | None = BASIC) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{sim.info['port']}{path}")
    if auth:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers["Content-Type"] == "application/json"
        return exc.code, json.loads(exc.read())


def test_every_sent_event_resolves_to_its_latest_state_and_lists_page(simulator):
    sim = simulator("--seed", "11", "--count", "400", "--rate", "0")
    frames = read_frames(sim, 402)      # auth, user-notifications, 400 events
    events = [json.loads(f.payload) for f in frames[2:]]
    latest = {e["resource_uri"]: e["state"] for e in events}

    for uri, state in latest.items():
        status, obj = get(sim, uri)
        assert status == 200, uri
        assert (obj["resource_uri"], obj["state"]) == (uri, state)
        assert obj["uuid"] == uri.rstrip("/").rsplit("/", 1)[1]

    containers = [u for u in latest if u.startswith("/api/v1/container/")]
    assert containers
    seen, path = [], "/api/v1/container/?limit=7"
    while path:
        status, listing = get(sim, path)
        assert status == 200
        assert set(listing["meta"]) == {"limit", "next", "offset", "previous", "total_count"}
        assert listing["meta"]["total_count"] == len(containers)
        seen += [o["resource_uri"] for o in listing["objects"]]
        path = listing["meta"]["next"]
    assert sorted(seen) == sorted(containers)

    a_container = next(e for e in events if e["type"] == "container")
    _, obj = get(sim, a_container["resource_uri"])
    service = next(p for p in a_container["parents"] if "/service/" in p)
    assert obj["service"] == service
    running = [u for u in containers if latest[u] == "Running"]
    _, listing = get(sim, "/api/v1/container/?state=Running&limit=1000")
    assert sorted(o["resource_uri"] for o in listing["objects"]) == sorted(running)


def test_unknown_uuid_is_a_json_404_and_credentials_are_the_streams(simulator):
    sim = simulator("--seed", "3", "--count", "5", "--rate", "0")
    read_frames(sim, 7)
    status, body = get(sim, "/api/v1/container/00000000-0000-4000-8000-000000000000/")
    assert status == 404 and body == {"detail": "Not found."}
    assert get(sim, "/api/v1/service/", auth=None)[0] == 401
    assert get(sim, "/api/v1/service/", auth=f"ApiKey {SIM_USER}:wrong")[0] == 401
    assert get(sim, "/api/v1/service/", auth=f"ApiKey {SIM_USER}:{SIM_APIKEY}")[0] == 200
    status, _ = get(sim, f"/api/v1/service/?user={SIM_USER}&token={SIM_APIKEY}", auth=None)
    assert status == 200


def test_with_fanout_the_rest_side_has_what_happened_while_no_client_listened(simulator):
    """What a client missed is what it resynchronises: REST must show it."""
    sim = simulator("--fanout", "--seed", "21", "--count", "200", "--rate", "400",
                    name="fanout")
    read_frames(sim, 3)                  # starts the world, then leaves
    wait_for(lambda: simulator_stats(sim)["last_seq"] == 200, 30, what="every event")
    same = simulator("--seed", "21", "--count", "200", "--rate", "0", name="reference")
    events = [json.loads(f.payload) for f in read_frames(same, 202)[2:]]
    latest = {e["resource_uri"]: e["state"] for e in events}
    for uri, state in latest.items():
        assert get(sim, uri)[1]["state"] == state, uri
