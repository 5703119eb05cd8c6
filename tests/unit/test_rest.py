"""The simulator's REST objects and pages (docs/contract.md section 6), in process."""

from bridge.simulator.rest import Registry, page

SERVICE = "/api/v1/service/s1/"


def event(kind, uuid, action, state, parents=()):
    return {"type": kind, "action": action, "state": state, "parents": list(parents),
            "resource_uri": f"/api/v1/{kind}/{uuid}/", "datetime": "Mon, 01 Jun 2015 00:00:00 +0000"}


def test_an_object_has_its_latest_state_and_its_parents_list_live_children():
    registry = Registry()
    registry.sent([b'{"type": "service", "action": "create", "state": "Init", '
                   b'"resource_uri": "/api/v1/service/s1/", "parents": []}', b"not json"])
    registry.apply(event("container", "c1", "create", "Starting", [SERVICE]))
    registry.apply(event("container", "c2", "create", "Starting", [SERVICE]))
    registry.apply(event("container", "c1", "update", "Running", [SERVICE]))
    registry.apply(event("container", "c2", "delete", "Terminated", [SERVICE]))
    assert registry.get("container", "c1")["state"] == "Running"
    assert registry.get("container", "c1")["service"] == SERVICE
    assert registry.get("container", "c2")["destroyed_datetime"]
    service = registry.get("service", "s1")
    assert service["containers"] == ["/api/v1/container/c1/"]
    assert service["current_num_containers"] == 1
    assert [o["uuid"] for o in registry.list("container", {"state": "Running"})] == ["c1"]
    assert registry.get("container", "nope") is None


def test_a_page_links_to_its_neighbours_keeping_the_filters():
    objects = [{"n": n} for n in range(5)]
    first = page("/api/v1/node/", objects, 2, 0, {"state": "Deployed"})
    assert first["meta"] == {"limit": 2, "offset": 0, "total_count": 5, "previous": None,
                             "next": "/api/v1/node/?state=Deployed&limit=2&offset=2"}
    last = page("/api/v1/node/", objects, 2, 4, {})
    assert last["objects"] == [{"n": 4}] and last["meta"]["next"] is None
    assert last["meta"]["previous"] == "/api/v1/node/?limit=2&offset=2"


def test_a_long_run_is_folded_a_batch_at_a_time_and_the_latest_state_still_wins(monkeypatch):
    import json
    monkeypatch.setattr("bridge.simulator.rest.FOLD_AT", 100)
    registry = Registry()
    for n in range(1_000):
        registry.sent([json.dumps(event("container", f"c{n % 7}", "update", f"S{n}")).encode()
                       for _ in range(3)])
        assert len(registry._pending) < 100 + 3     # never a whole backlog folded at once
    assert registry.get("container", "c5")["state"] == "S999"
    assert registry.get("container", "c6")["state"] == "S993"
