"""The README names only what the code has: an operator greps the logs for the event a
runbook entry names, graphs the metric it names, sets the variable and flag the table
gives, and a worker author copies the testing kit's example. A rename in the code
must fail here rather than leave a README that sends them looking for nothing."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bridge import config
from tests.unit.test_operator_files import exported

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
LOG_EVENT = r"(?:stream|broker|spool|bridge|frame|ha|publisher)\.[a-z_]+"
ROUTING_KEYS = {"bridge.connected", "bridge.disconnected"}   # bridge events, not log lines


def section(heading: str) -> str:
    start = README.index(heading + "\n")
    end = README.find("\n#", start + len(heading))
    return README[start:end if end >= 0 else len(README)]


def test_every_log_event_the_readme_names_is_one_the_code_logs():
    code = "\n".join(p.read_text() for p in (ROOT / "bridge").rglob("*.py"))
    emitted = set(re.findall(rf'"({LOG_EVENT})"', code))
    named = {n for n in re.findall(rf"`({LOG_EVENT})`", README)
             if not n.endswith(".py")} - ROUTING_KEYS
    assert named and named <= emitted, sorted(named - emitted)


def test_every_metric_the_readme_names_is_exported():
    names = exported()
    names |= {n[:-len("_bucket")] for n in names if n.endswith("_bucket")}   # a histogram
    full = set(re.findall(r"\btutum_bridge_[a-z0-9_]*[a-z0-9]", README))
    listed = section("### Observing it")
    listed = listed[listed.index("- `GET /metrics`"):listed.index("- `GET /livez`")]
    short = {"tutum_bridge_" + n
             for n in re.findall(r"`([a-z][a-z0-9_]*[a-z0-9])(?:\{[a-z,]*\})?`", listed)
             if not n.startswith(("process_", "python_"))}
    assert short and full <= names and short <= names, sorted((full | short) - names)


def test_every_alert_the_readme_names_is_a_rule():
    rules = {r["alert"] for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml")
                                                .read_text())["groups"] for r in g["rules"]}
    named = set(re.findall(r"`(TutumBridge[A-Za-z]+)`", README))
    assert named and named <= rules, sorted(named - rules)


def test_the_configuration_table_is_every_setting_with_its_flag_and_default():
    settings = {s.env: s for s in config.ALL_RUN_SETTINGS}
    table = section("### Configuration")
    seen = set()
    for row in (line for line in table.splitlines() if line.startswith("| `")):
        variables, flags, default = (re.findall(r"`([^`]+)`", cell)
                                     for cell in row.strip("|").split("|")[:3])
        assert flags == [settings[v].flag for v in variables], row
        if all(settings[v].default is not None for v in variables):
            assert default == [settings[v].default for v in variables], row
        seen.update(variables)
    assert seen == set(settings), sorted(set(settings) ^ seen)


def test_the_testing_kit_example_is_the_sample_the_suite_runs():
    kit = section("### Testing a worker (the `testing` extra)")
    shown = re.search(r"```python\n(.*?)```", kit, re.S).group(1)
    sample = (ROOT / "tests/kit_sample/inventory_sample.py").read_text()
    assert shown[shown.index("def test_"):] == sample[sample.index("def test_"):]
