"""TLS listeners, a password file and a 1,000-rule ACL for the security scenarios (S11-S13,
`scenarios_security.py`), the same files for edge-broker and mosquitto.

The files are made once per run (`material()`), in a temporary directory removed at exit:

- `certs/`: `edge-broker certs init-ca` and `edge-broker certs server --ip 127.0.0.1
  --host localhost` (EC P-256). Both brokers get `cafile`, `certfile` and `keyfile` from it;
  the load generator verifies the server against `ca.crt` (no client certificates).
- `passwd`: the user `bench` (the name every benchmark client sends) with `PASSWORD`, written
  by `edge-broker passwd` in mosquitto 2's `$7$` format (PBKDF2-SHA512, 101 iterations, what
  `mosquitto_passwd` writes too), so both brokers read the same file.
- `acl`: `ACL_RULES` rules in mosquitto's syntax (`acl_text()`): the user `bench` is the
  gateway's collector account, granted each device's tree one rule per device, and the
  benchmark's own topics by the last rule.

A real gateway runs with a password file and `allow_anonymous false` (edge-broker's and
mosquitto 2's default once a password file is set), so S13 does too: its clients log in as
`bench`. S11/S12 (TLS only) stay anonymous like S1/S3, so that they measure TLS alone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSWORD = "bench-secret-0"
ACL_RULES = 1000
ACL_USER = "bench"
ACL_BENCH_FILTER = "bench/#"    # the one rule that grants the benchmark's topics


@dataclass(frozen=True)
class Security:
    tls: bool = False    # the broker's listener speaks TLS (clients verify it with the CA)
    acl: bool = False    # password file + ACL_RULES-rule ACL, allow_anonymous false

    @property
    def active(self) -> bool:
        return self.tls or self.acl


@dataclass(frozen=True)
class Material:
    root: Path
    cafile: Path
    certfile: Path
    keyfile: Path
    passwd: Path
    acl: Path


_MATERIAL: Material | None = None


def acl_text(rules: int = ACL_RULES) -> str:
    """mosquitto's ACL syntax, `rules` rules in the section of the user `bench`: one per other
    device (`site/devNNNN/...`, telemetry read, commands readwrite, alternating), then
    `topic readwrite bench/#`. A check of a benchmark topic walks every rule before it in a
    matcher that goes through the list in order (mosquitto 2.0 does, per user); edge-broker
    compiles the section into a trie and caches decisions per connection."""
    lines = [f"# {rules} rules, written by benchmarks/security.py", f"user {ACL_USER}"]
    for k in range(rules - 1):
        if k % 2:
            lines.append(f"topic readwrite site/dev{k:04d}/cmd/#")
        else:
            lines.append(f"topic read site/dev{k:04d}/telemetry/#")
    lines.append(f"topic readwrite {ACL_BENCH_FILTER}")
    return "\n".join(lines) + "\n"


def _edge_cli(*args: str, stdin: str | None = None) -> None:
    from .brokers import REPO_ROOT, _edge_env
    cmd = [sys.executable, "-m", "edge_broker", *args]
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60,
                       cwd=REPO_ROOT, env=_edge_env())
    if r.returncode != 0:
        raise RuntimeError(f"`edge-broker {' '.join(args)}` exited with {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")


def material() -> Material:
    """The certificates, password file and ACL of this run (made on first use)."""
    global _MATERIAL
    if _MATERIAL is not None and _MATERIAL.root.exists():
        return _MATERIAL
    root = Path(tempfile.mkdtemp(prefix="bench-security-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    certs = root / "certs"
    _edge_cli("certs", "init-ca", str(certs))
    _edge_cli("certs", "server", str(certs), "--ip", "127.0.0.1", "--host", "localhost")
    passwd = root / "passwd"
    _edge_cli("passwd", "-c", "--password-stdin", str(passwd), ACL_USER, stdin=PASSWORD + "\n")
    acl = root / "acl"
    acl.write_text(acl_text())
    _give_to_mosquitto(root)
    _MATERIAL = Material(root, certs / "ca.crt", certs / "server.crt", certs / "server.key",
                         passwd, acl)
    return _MATERIAL


def _give_to_mosquitto(root: Path) -> None:
    """mosquitto started as root drops to the user `mosquitto` before it reads its certificates
    and password file: as on a real gateway, the files belong to the broker's user (modes
    stay 0700/0600; edge-broker, run by the same root runner, reads them anyway)."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)


def client_context(cafile: str | None) -> ssl.SSLContext | None:
    from .tlsio import client_tls
    return client_tls(cafile)


def mosquitto_lines(sec: Security | None) -> list[str]:
    """The listener's TLS lines (right after `listener`) and the auth lines."""
    if sec is None or not sec.active:
        return ["allow_anonymous true"]
    m = material()
    out = []
    if sec.tls:
        out += [f"cafile {m.cafile}", f"certfile {m.certfile}", f"keyfile {m.keyfile}",
                "tls_version tlsv1.2",          # the minimum, as edge-broker's
                "require_certificate false"]
    if sec.acl:
        out += ["allow_anonymous false", f"password_file {m.passwd}", f"acl_file {m.acl}"]
    else:
        out.append("allow_anonymous true")
    return out


def _q(p: Path) -> str:
    return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'


def edge_listener_lines(sec: Security | None) -> list[str]:
    if sec is None or not sec.tls:
        return []
    m = material()
    return [f"cafile = {_q(m.cafile)}", f"certfile = {_q(m.certfile)}",
            f"keyfile = {_q(m.keyfile)}"]


def edge_auth_lines(sec: Security | None) -> list[str]:
    if sec is None or not sec.acl:
        return ["allow_anonymous = true"]
    m = material()
    return [f"password_file = {_q(m.passwd)}", f"acl_file = {_q(m.acl)}",
            "allow_anonymous = false"]


def client_side(sec: Security | None) -> dict[str, Any]:
    """RunningBroker fields: what the load generator needs to reach this broker."""
    if sec is None or not sec.active:
        return {}
    m = material()
    return {"cafile": str(m.cafile) if sec.tls else None,
            "password": PASSWORD if sec.acl else None}


def settings(sec: Security) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if sec.tls:
        out["tls"] = ("server certificate EC P-256 from `edge-broker certs`, TLS 1.2 minimum, "
                      "no client certificate")
    if sec.acl:
        out["auth"] = (f"password_file (user {ACL_USER}, $7$ PBKDF2-SHA512), acl_file with "
                       f"{ACL_RULES} rules, allow_anonymous false")
    return out


def negotiated(host: str, port: int, cafile: str, password: str | None = None) -> dict[str, Any]:
    """The TLS version and cipher a load generator connection gets (recorded in details)."""
    from . import wire
    sock, _, _ = wire.open_session(host, port, "bench-tls-probe", timeout_s=5.0,
                                   tls=client_context(cafile), password=password)
    try:
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        return {"version": sock.version(), "cipher": cipher[0] if cipher else None,
                "openssl": ssl.OPENSSL_VERSION}
    finally:
        with contextlib.suppress(OSError):
            sock.sendall(wire.DISCONNECT)
        sock.close()

