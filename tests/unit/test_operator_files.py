"""The alert rules and the Grafana dashboard name only metrics the bridge exports
(a renamed metric would leave an alert that never fires, a panel that stays empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from bridge.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "info": ("_info",), "unknown": ("",), "summary": ("_sum", "_count")}
NAME = re.compile(r"\b((?:tutum_bridge|process|python)_[a-z0-9_]+)")


def exported() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def test_every_alert_names_exported_metrics_and_the_issue_asks_for_each():
    rules = [r for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
             for r in g["rules"]]
    names = exported()
    for rule in rules:
        used = set(NAME.findall(rule["expr"]))
        assert used and used <= names, (rule["alert"], used - names)
        assert rule["labels"]["severity"] in ("warning", "critical")
    alerts = {r["alert"] for r in rules}
    assert {"TutumBridgeStreamDown", "TutumBridgeBrokerDown", "TutumBridgeSpoolFilling",
            "TutumBridgeSpoolNearFull", "TutumBridgeQuarantining",
            "TutumBridgeOldestEventOld"} <= alerts


def test_the_dashboard_loads_and_every_query_names_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "tutum-bridge.json").read_text())
    names = exported()
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert queries
    for query in queries:
        used = set(NAME.findall(query))
        assert used and used <= names, (query, used - names)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
