"""A private PKI for the TLS tests, made with the `openssl` command at test time.

Nothing is checked in: each session gets fresh keys, so no test can pass because of a
certificate left over on the machine. Two CAs: `ca` signs everything the tests trust
(server certificates for 127.0.0.1 and localhost, a client certificate, and a server
certificate for another name), `untrusted_ca` stands for "some other CA" in the tests
that must fail. EC P-256 keys: generated in milliseconds, accepted by Python's ssl
and by Erlang's (RabbitMQ).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"

_CA_EXT = """\
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = {san}
"""


@dataclass(frozen=True)
class Pki:
    """Paths of PEM files; every key is unencrypted and readable by its owner only."""

    directory: Path
    ca: Path
    untrusted_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_name_cert: Path        # signed by `ca`, but for another host name
    wrong_name_key: Path
    untrusted_client_cert: Path  # a client certificate signed by `untrusted_ca`
    untrusted_client_key: Path


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", path)
    path.chmod(0o600)
    return path


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert, ext = directory / f"{name}.key", directory / f"{name}.pem", directory / f"{name}.ext"
    ext.write_text("[v3]\n" + _CA_EXT)
    _openssl("req", "-x509", "-new", "-key", _key(key), "-out", cert, "-days", _DAYS,
             "-subj", f"/CN=tutum-bridge test {name}", "-config", ext, "-extensions", "v3")
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], *, usage: str,
          san: str) -> tuple[Path, Path]:
    key, csr = _key(directory / f"{name}.key"), directory / f"{name}.csr"
    cert, ext = directory / f"{name}.pem", directory / f"{name}.ext"
    ext.write_text("[v3]\n" + _LEAF_EXT.format(usage=usage, san=san))
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", _DAYS, "-extfile", ext, "-extensions", "v3")
    return cert, key


def make_pki(directory: Path) -> Pki:
    """Create both CAs and all certificates under `directory`."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl command")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    other = _ca(directory, "untrusted-ca")
    server = _leaf(directory, "server", ca, usage="serverAuth",
                   san="DNS:localhost, IP:127.0.0.1")
    client = _leaf(directory, "client", ca, usage="clientAuth", san="DNS:tutum-bridge-client")
    wrong = _leaf(directory, "wrong-name", ca, usage="serverAuth", san="DNS:other.invalid")
    stranger = _leaf(directory, "untrusted-client", other, usage="clientAuth",
                     san="DNS:stranger")
    return Pki(directory=directory, ca=ca[0], untrusted_ca=other[0],
               server_cert=server[0], server_key=server[1],
               client_cert=client[0], client_key=client[1],
               wrong_name_cert=wrong[0], wrong_name_key=wrong[1],
               untrusted_client_cert=stranger[0], untrusted_client_key=stranger[1])
