"""Brokers with a password file, an ACL and quotas, for the security tests.

Password files are written by Debian's `mosquitto_passwd` when it is installed (the point:
a mosquitto user's file is accepted as it is), else by edge-broker's own writer.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_broker.auth.passwd import PasswordFile
from edge_broker.config import AuthConfig, QuotasConfig
from edge_broker.server import gate
from tests.conftest import BrokerThread, broker_config

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

USERS = {"alice": "alice-pw", "bob": "bob-pw", "dev1": "dev1-pw", "ops": "ops pw ü"}


def write_passwords(path: Path, users: dict[str, str], *, mosquitto: bool = True) -> Path:
    """A password file for `users`, by mosquitto_passwd (batch mode) when available."""
    if mosquitto and MOSQUITTO_PASSWD is not None:
        path.unlink(missing_ok=True)
        for index, (name, password) in enumerate(users.items()):
            flags = ["-c"] if index == 0 else []
            subprocess.run([MOSQUITTO_PASSWD, *flags, "-b", str(path), name, password],
                           check=True, capture_output=True, timeout=30)
        return path
    passwords = PasswordFile()
    for name, password in users.items():
        passwords.set(name, password)
    passwords.save(path)
    return path


def auth_config(tmp_path: Path, *, users: dict[str, str] | None = USERS,
                acl: str | None = None, allow_anonymous: bool = False,
                quotas: QuotasConfig | None = None, **mqtt: Any) -> Any:
    config = broker_config(tmp_path, **mqtt)
    password_file = acl_file = None
    if users is not None:
        password_file = write_passwords(tmp_path / "passwd", users)
    if acl is not None:
        acl_file = tmp_path / "acl"
        acl_file.write_text(acl, encoding="utf-8")
    return dataclasses.replace(
        config,
        auth=AuthConfig(allow_anonymous=allow_anonymous, allow_anonymous_explicit=True,
                        password_file=password_file, acl_file=acl_file),
        quotas=quotas or QuotasConfig())


def auth_broker_factory(make_broker: Callable[..., BrokerThread],
                        tmp_path: Path) -> Callable[..., BrokerThread]:
    """For a `make_auth_broker` fixture: make(users=..., acl="...", allow_anonymous=False,
    quotas=..., **mqtt) starts a broker with those files."""
    def make(**kwargs: Any) -> BrokerThread:
        return make_broker(config=auth_config(tmp_path, **kwargs))

    return make


def disable_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse wrong passwords at once (the back-off is tested on its own)."""
    monkeypatch.setattr(gate, "BACKOFF_BASE_S", 0.0)
