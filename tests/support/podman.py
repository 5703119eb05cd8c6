"""Podman for tests that build and run real images (see /work/shared/containers.md).

Importing this module installs and starts nothing. `podman_or_skip()` finds podman
(`.ci/run` installs it: apt-get podman runc mmdebstrap) and returns a `Podman` whose
every command runs with a containers.conf of our own (CONTAINERS_CONF, in a temp
dir), so nothing outside the test changes; without podman the test skips with one line.

Images that cannot be pulled here are built from Debian packages with mmdebstrap,
under the names the Dockerfile and the compose file use, and kept: the cost (about
40 s each) is paid once per machine, later tests and runs reuse the tags.

- `base_image`: stands in for `python:3.11-slim` (bookworm minbase with Python; PEP 668
  marker removed, `python` provided, as in the official image).
- `rabbitmq_image`: stands in for `rabbitmq:3-management` (Debian's rabbitmq-server
  with the management plugin, guest allowed from other hosts as in the official image).

Builds and image creation hold a machine-wide file lock, so parallel test runs do
not build the same image twice or race on a tag.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import ssl
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

BASE_IMAGE = "localhost/python:3.11-slim"
RABBITMQ_IMAGE = "localhost/rabbitmq:3-management"
LOCK_FILE = Path(tempfile.gettempdir()) / "tutum-bridge-podman.lock"

# crun refuses this machine's hybrid cgroups; the default ulimits ask for more than a
# process may set here; there is no systemd to take podman's events.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

_BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
_RABBITMQ_CONF = ("loopback_users.guest = false\\n"
                  "listeners.tcp.default = 5672\\n"
                  "management.tcp.port = 15672\\n")


class Podman:
    """podman with this module's containers.conf; `run` returns the finished process."""

    def __init__(self, executable: str, conf_dir: Path) -> None:
        self.executable = executable
        self.conf_dir = conf_dir
        conf = conf_dir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([self.executable, *args], env=self.env, input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... exited {result.returncode}:\n"
                                 f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return result

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def build(self, context: Path, tag: str, *extra: str, timeout: float = 600) -> str:
        """`podman build` of the Dockerfile in `context` as it is, with no pull.

        `--format docker` keeps HEALTHCHECK (the OCI format drops it silently). pip in a
        RUN step gets the host's CA bundle and a pip.conf naming it, mounted for the
        build only: outbound HTTPS here is re-signed by a local authority that pip's
        own certifi does not know. Nothing of either stays in the image.
        `--layers=false` and removing the image the tag held before keep repeated
        builds from piling up untagged images of a few hundred MB each.
        """
        bundle = host_ca_bundle()
        pip_conf = self.conf_dir / "pip.conf"
        pip_conf.write_text("[global]\ncert = /etc/ssl/host-ca.crt\n")
        with machine_lock():
            before = self.image_id(tag)
            self.run("build", "--format", "docker", "--pull=never", "--layers=false", "--tag", tag,
                     "--volume", f"{bundle}:/etc/ssl/host-ca.crt:ro",
                     "--volume", f"{pip_conf}:/etc/pip.conf:ro",
                     *extra, str(context), timeout=timeout)
            if before and before != self.image_id(tag):
                # The tag moved: the previous build is untagged; without this every
                # run with changed code would leave a few hundred MB behind.
                self.run("rmi", before, check=False)
        return tag

    def image_id(self, name: str) -> str | None:
        result = self.run("image", "inspect", "--format", "{{.Id}}", name, check=False)
        return result.stdout.strip() or None if result.returncode == 0 else None

    def remove_containers(self, *names: str) -> None:
        if names:
            self.run("rm", "--force", "--ignore", "--volumes", "--time", "0", *names, check=False, timeout=120)

    def logs(self, name: str) -> str:
        result = self.run("logs", name, check=False, timeout=60)
        return result.stdout + result.stderr

    @contextlib.contextmanager
    def container(self, image: str, *args: str, name: str | None = None,
                  options: tuple[str, ...] = ()):
        """`podman run --detach`; yields the container's name and removes it after,
        whatever happened."""
        name = name or f"tb-test-{uuid.uuid4().hex[:10]}"
        try:
            self.run("run", "--detach", "--name", name, *options, image, *args, timeout=120)
            yield name
        finally:
            self.remove_containers(name)


def podman_or_skip() -> Podman:
    """A ready `Podman`, or skip the test with one line saying what is missing."""
    executable = shutil.which("podman")
    if executable is None:
        pytest.skip("podman is not installed (apt-get install podman runc mmdebstrap)")
    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (apt-get install runc): crun cannot run here")
    return Podman(executable, Path(tempfile.mkdtemp(prefix="tb-podman-")))


def host_ca_bundle() -> str:
    """The CA bundle the host's TLS trusts (the system one), for builds that use pip."""
    return ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"


@contextlib.contextmanager
def machine_lock():
    """One image build or import at a time on this machine, across processes."""
    with LOCK_FILE.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _debian_image(podman: Podman, tag: str, packages: str, hook: str,
                  changes: tuple[str, ...] = ()) -> str:
    with machine_lock():
        if podman.image_exists(tag):
            return tag
        if shutil.which("mmdebstrap") is None:
            pytest.skip(f"{tag} is missing and mmdebstrap is not installed (apt-get install mmdebstrap)")
        with tempfile.TemporaryDirectory(prefix="tb-rootfs-") as tmp:
            tarball = Path(tmp) / "rootfs.tar"
            result = subprocess.run(
                ["mmdebstrap", "--variant=minbase", f"--include={packages}",
                 f"--customize-hook={hook}", "bookworm", str(tarball)],
                capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise AssertionError(f"mmdebstrap for {tag} failed:\n{result.stderr[-3000:]}")
            podman.run("import", *(f"--change={c}" for c in changes), str(tarball), tag,
                       timeout=300)
    return tag


def base_image(podman: Podman) -> str:
    """The stand-in for `python:3.11-slim` the Dockerfile builds FROM."""
    return _debian_image(
        podman, BASE_IMAGE, _BASE_PACKAGES,
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
        ("ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         'CMD=["python3"]'))


def rabbitmq_image(podman: Podman) -> str:
    """The stand-in for `rabbitmq:3-management`: AMQP on 5672, management on 15672.

    Started with /usr/lib/rabbitmq/bin/rabbitmq-server, because Debian's /usr/sbin
    wrapper sends the node's output to a file instead of the container's log.
    """
    hook = ('printf "[rabbitmq_management].\\n" > "$1"/etc/rabbitmq/enabled_plugins; '
            f'printf "{_RABBITMQ_CONF}" > "$1"/etc/rabbitmq/rabbitmq.conf')
    return _debian_image(
        podman, RABBITMQ_IMAGE, "rabbitmq-server", hook,
        ("USER=rabbitmq", "ENV=HOME=/var/lib/rabbitmq", "WORKDIR=/var/lib/rabbitmq",
         "EXPOSE=5672", "EXPOSE=15672", 'CMD=["/usr/lib/rabbitmq/bin/rabbitmq-server"]'))
