"""server/gate.py without a network: the certificate identity (`use_identity_as_username`,
whose listeners arrive with the TLS work, so the listener is a stand-in here), the failed-login
back-off schedule, the publish quota's token bucket, and a password check that a SIGHUP
overtakes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edge_broker.auth.passwd import PasswordFile
from edge_broker.config import AuthConfig, Config
from edge_broker.mqtt.packets import Connect
from edge_broker.mqtt.types import ReasonCode
from edge_broker.server import gate
from edge_broker.server.gate import Decision, Gate, Throttle
from edge_broker.server.metrics import Metrics


class FakeTransport:
    def __init__(self, peercert: dict[str, Any] | None) -> None:
        self.peercert = peercert

    def get_extra_info(self, name: str) -> Any:
        return {"peercert": self.peercert, "peername": ("10.0.0.7", 40000)}.get(name)


def make_gate() -> Gate:
    app = SimpleNamespace(config=Config(auth=AuthConfig(allow_anonymous=False)),
                          metrics=Metrics())
    return Gate(app)  # type: ignore[arg-type]


def handler(peercert: dict[str, Any] | None) -> Any:
    return SimpleNamespace(transport=FakeTransport(peercert), peer="10.0.0.7:40000")


@pytest.fixture
def certificate_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = SimpleNamespace(use_identity_as_username=True, certificate_authentication=True,
                               anonymous_allowed=lambda auth: False)
    monkeypatch.setattr(gate, "listener_of", lambda handler: listener)


def test_the_certificate_cn_is_the_username_and_no_password_is_asked(
        certificate_listener: None) -> None:
    decision = make_gate().start_authentication(
        handler({"subject": ((("commonName", "sensor-7"),),)}),
        Connect("c", username="someone-else", password=b"ignored"))
    assert decision == Decision("sensor-7", how="certificate")


@pytest.mark.parametrize("peercert", [None, {}, {"subject": ((("organizationName", "x"),),)},
                                      {"subject": ((("commonName", "a"),),
                                                   (("commonName", "b"),))}])
def test_no_usable_cn_is_not_authorized(certificate_listener: None,
                                        peercert: dict[str, Any] | None) -> None:
    gate_ = make_gate()
    decision = gate_.start_authentication(handler(peercert), Connect("c"))
    assert decision == Decision(None, ReasonCode.NOT_AUTHORIZED)
    assert gate_.metrics.auth_refused["not_authorized"] == 1


def test_failed_logins_back_off_exponentially_up_to_the_cap() -> None:
    gate_ = make_gate()
    delays = [gate_._failure_delay("10.0.0.7") for _ in range(12)]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]
    assert delays[-1] == gate.BACKOFF_CAP_S
    assert gate_._failure_delay("10.0.0.8") == 0.05  # another address starts afresh


def test_the_token_bucket_holds_the_rate() -> None:
    bucket = Throttle(10.0, 0, now=0.0)  # 10 messages/s, 0.1 s of credit = 1 message
    bucket.charge(100, now=0.0)
    assert bucket.delay(0.0) == 0
    bucket.charge(100, now=0.0)
    assert bucket.delay(0.0) == pytest.approx(0.1)
    assert bucket.delay(0.1) == 0
    # Idle for a long time: the credit is capped at 0.1 s worth, not a long burst.
    for _ in range(2):
        bucket.charge(100, now=100.0)
    assert bucket.delay(100.0) == pytest.approx(0.1)


def test_the_bytes_bucket_goes_into_debt_by_one_packet() -> None:
    bucket = Throttle(0, 1000, now=0.0)
    bucket.charge(5000, now=0.0)  # a packet larger than the credit passes, then waits
    assert bucket.delay(0.0) == pytest.approx(4.9)


def password_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  users: dict[str, str]) -> tuple[Gate, Path]:
    """A gate checking `users` (cheap hashes) for a client on a listener with passwords."""
    path = tmp_path / "passwd"
    save_passwords(path, users)
    app = SimpleNamespace(config=Config(auth=AuthConfig(allow_anonymous=False,
                                                        password_file=str(path))),
                          metrics=Metrics(), loop=asyncio.get_running_loop(), connections=[],
                          finish_batch=lambda *args: None)
    listener = SimpleNamespace(use_identity_as_username=False,
                               anonymous_allowed=lambda auth: False)
    monkeypatch.setattr(gate, "listener_of", lambda handler: listener)
    gate_ = Gate(app)  # type: ignore[arg-type]
    gate_.load()
    return gate_, path


def save_passwords(path: Path, users: dict[str, str]) -> None:
    passwords = PasswordFile.load(path) if path.exists() else PasswordFile()
    for name in passwords.usernames():
        if name not in users:
            passwords.delete(name)
    for name, password in users.items():
        if not passwords.verify(name, password):  # an unchanged user keeps its line
            passwords.set(name, password, iterations=1000)
    passwords.save(path)


@pytest.mark.parametrize("change", ["new password", "user deleted", "nothing"])
async def test_a_password_revoked_by_sighup_during_its_check_does_not_let_the_client_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    gate_, path = password_gate(tmp_path, monkeypatch, {"alice": "old-pw", "ops": "ops-pw"})
    pending = gate_.start_authentication(handler(None),
                                         Connect("c", username="alice", password=b"old-pw"))
    assert isinstance(pending, asyncio.Future)  # the hash is computed on a worker thread
    verifier = gate_.verifier
    assert verifier is not None
    deadline = time.monotonic() + 10
    while verifier.pending == 0:  # until the check has taken the file it checks against
        assert time.monotonic() < deadline
        await asyncio.sleep(0)
    after = {"new password": {"alice": "new-pw", "ops": "ops-pw"},
             "user deleted": {"ops": "ops-pw"},
             "nothing": {"alice": "old-pw", "ops": "ops-pw"}}[change]
    save_passwords(path, after)
    assert gate_.reload(gate_.app.config.auth)  # SIGHUP, before the check is done
    decision = await asyncio.wait_for(pending, 10)
    if change == "nothing":
        assert decision == Decision("alice", how="password")
    else:
        assert decision == Decision(None, ReasonCode.BAD_USER_NAME_OR_PASSWORD)
    gate_.close()
