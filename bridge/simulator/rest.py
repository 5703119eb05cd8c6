"""The simulator's REST side: `GET /api/v1/<kind>/` and `/api/v1/<kind>/<uuid>/` (docs/contract.md section 6).

A worker resynchronises through the REST API after a `bridge.connected` with a gap,
and the hosted API is gone, so the simulator answers it. What it promises:
- consistency with the stream: the objects are built from the events the simulator
  has *sent* (and from events `apply`-ed directly: what happened while no client
  listened), not from its world, which runs ahead of the stream. The `resource_uri` of every event sent resolves, and
  an object's `state` is the one its latest event carried (a deleted object stays, in
  its last state, as Tutum kept terminated objects listed);
- Tutum's format: a list is `{"meta": {"limit", "next", "offset", "previous",
  "total_count"}, "objects": [...]}` with `?limit=&offset=` paging (default 25, at
  most 1000) and equality filters on an object's text fields (`?state=Running`);
  an object has `uuid`, `resource_uri`, `state` and its kind's links (a container's
  `service`, `stack` and `node`, a service's `stack` and `containers`, ...);
- the stream's credentials (query `token`/`user`, `Basic`, `ApiKey`); a missing or
  bad one is 401, an unknown kind or uuid 404, each with a JSON body.

Events are folded in lazily (when a request comes, or once many are pending), so
serving the stream costs one list append per batch; past FOLD_AT pending, each batch
sent folds in twice its size of the oldest, so a long run holds a bounded backlog
and never stops the event loop to fold it all at once.
"""

from __future__ import annotations

import http
import json
import re
from collections import defaultdict, deque
from urllib.parse import parse_qsl, urlencode, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Response

from bridge.simulator.auth import Credentials

PREFIX = "/api/v1/"
DEFAULT_LIMIT, MAX_LIMIT = 25, 1000
# Pending bodies are folded in without waiting for a request past this many (about
# 35 MB): folding costs ~6 us an event, more than generating it, so a benchmark's burst
# (50,000 events) must not pay it unless something asks the REST side. Folding all of
# them at once stopped the stream for 1.5 s every 50 s of a 2,000 events/s soak
# (`tutum-bridge bench --soak`), hence the folding a batch at a time past it.
FOLD_AT = 100_000
_URI = re.compile(r"\A/api/v1/([a-z][a-z_-]*)/([0-9A-Za-z-]+)/\Z")
# Query parameters that are not filters: paging, and the credentials of form 1.
_NOT_FILTERS = {"limit", "offset", "token", "user", "format"}
# A parent link as Tutum's objects name it, by the parent's kind.
_LINK = {"nodecluster": "node_cluster"}
# The list of children a parent carries, by (parent kind, child kind).
_CHILDREN = {("service", "container"): "containers", ("stack", "service"): "services",
             ("node", "container"): "containers", ("nodecluster", "node"): "nodes"}
_COUNTS = {"containers": "current_num_containers", "nodes": "current_num_nodes"}


def parse_uri(uri: object) -> tuple[str, str] | None:
    """(kind, uuid) of `/api/v1/<kind>/<uuid>/`, else None."""
    match = _URI.match(uri) if isinstance(uri, str) else None
    return (match.group(1), match.group(2)) if match else None


class Registry:
    """Every object the stream has told about, in the state its latest event gave."""

    def __init__(self) -> None:
        self._pending: deque[bytes] = deque()
        self._objects: dict[str, dict[str, dict]] = defaultdict(dict)   # kind -> uuid -> obj
        self._children: dict[str, dict[str, None]] = defaultdict(dict)  # parent uri -> child uris
        self._deleted: set[str] = set()

    def sent(self, payloads: list[bytes]) -> None:
        """Event bodies (JSON text) handed to a client, in the order sent."""
        self._pending.extend(payloads)
        if len(self._pending) >= FOLD_AT:
            self._fold(2 * len(payloads))

    def _fold(self, at_most: int | None = None) -> None:
        """Take the oldest pending bodies into the objects (all of them by default)."""
        pending = self._pending
        count = len(pending) if at_most is None else min(at_most, len(pending))
        for payload in [pending.popleft() for _ in range(count)]:
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if isinstance(event, dict):
                self._apply(event)

    def apply(self, event: dict) -> None:
        """An event that changes the objects without being sent (after those sent)."""
        self._fold()
        self._apply(event)

    def _apply(self, event: dict) -> None:
        """Take one event into the objects (events without a REST URI change nothing)."""
        where = parse_uri(event.get("resource_uri"))
        if where is None:
            return
        kind, uuid = where
        uri = event["resource_uri"]
        obj = self._objects[kind].setdefault(uuid, {"uuid": uuid, "resource_uri": uri})
        if "state" in event:
            obj["state"] = event["state"]
        if isinstance(event.get("datetime"), str):
            obj.setdefault("created_datetime", event["datetime"])
            if str(event.get("action", "")).lower() == "delete":
                obj["destroyed_datetime"] = event["datetime"]
        if str(event.get("action", "")).lower() == "delete":
            self._deleted.add(uri)
        parents = event.get("parents")
        for parent in parents if isinstance(parents, list) else ():
            linked = parse_uri(parent)
            if linked is None:
                continue
            if kind == "action":
                obj.setdefault("object", parent)
                continue
            obj.setdefault(_LINK.get(linked[0], linked[0]), parent)
            self._children[parent][uri] = None

    def get(self, kind: str, uuid: str) -> dict | None:
        self._fold()
        obj = self._objects.get(kind, {}).get(uuid)
        return None if obj is None else self._view(kind, obj)

    def list(self, kind: str, filters: dict[str, str]) -> list[dict]:
        self._fold()
        views = (self._view(kind, obj) for obj in self._objects.get(kind, {}).values())
        return [v for v in views
                if all(str(v.get(name)) == value for name, value in filters.items())]

    def _view(self, kind: str, obj: dict) -> dict:
        """The object with its live children's lists, as Tutum showed them."""
        view = dict(obj)
        view.setdefault("state", None)
        for (parent_kind, child_kind), field in _CHILDREN.items():
            if parent_kind != kind:
                continue
            children = [uri for uri in self._children.get(obj["resource_uri"], ())
                        if uri not in self._deleted and f"/{child_kind}/" in uri]
            view[field] = children
            if field in _COUNTS:
                view[_COUNTS[field]] = len(children)
        return view


def respond(ws: ServerConnection, path: str, headers: Headers, credentials: Credentials,
            registry: Registry) -> Response:
    """The answer to one GET under /api/v1/."""
    if credentials.check(path, headers) is None:
        return json_response(ws, http.HTTPStatus.UNAUTHORIZED,
                     {"detail": "Incorrect authentication credentials."})
    parts = urlsplit(path)
    words = [w for w in parts.path[len(PREFIX):].split("/") if w]
    if len(words) == 2:
        obj = registry.get(*words)
        if obj is None:
            return json_response(ws, http.HTTPStatus.NOT_FOUND, {"detail": "Not found."})
        return json_response(ws, http.HTTPStatus.OK, obj)
    if len(words) != 1:
        return json_response(ws, http.HTTPStatus.NOT_FOUND, {"detail": "Not found."})
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    try:
        limit = min(int(query.get("limit", DEFAULT_LIMIT)), MAX_LIMIT)
        offset = int(query.get("offset", 0))
        if limit < 0 or offset < 0:
            raise ValueError
    except ValueError:
        return json_response(ws, http.HTTPStatus.BAD_REQUEST,
                     {"detail": "limit and offset must be whole numbers, 0 or more"})
    filters = {k: v for k, v in query.items() if k not in _NOT_FILTERS}
    objects = registry.list(words[0], filters)
    return json_response(ws, http.HTTPStatus.OK, page(parts.path, objects, limit, offset, filters))


def page(path: str, objects: list[dict], limit: int, offset: int,
         filters: dict[str, str]) -> dict:
    """Tutum's list envelope around `objects[offset:offset + limit]`."""
    def link(at: int) -> str:
        return f"{path}?{urlencode({**filters, 'limit': limit, 'offset': at})}"

    total = len(objects)
    return {"meta": {"limit": limit, "offset": offset, "total_count": total,
                     "next": link(offset + limit) if limit and offset + limit < total else None,
                     "previous": link(max(0, offset - limit)) if offset and limit else None},
            "objects": objects[offset:offset + limit]}


def json_response(ws: ServerConnection, status: http.HTTPStatus, body: dict) -> Response:
    response = ws.respond(status, json.dumps(body) + "\n")
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response
