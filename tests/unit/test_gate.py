"""server/gate.py without a network: the certificate identity (`use_identity_as_username`,
whose listeners arrive with the TLS work, so the listener is a stand-in here), the failed-login
back-off schedule, and the publish quota's token bucket."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

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
