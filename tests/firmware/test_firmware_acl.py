"""Every firmware example uses topics, client ids and session settings that the gateway's example
ACL (deploy/edge-broker.acl.example) allows - including the ESP32 ones this machine cannot build.

Each example declares what it does in `edge-broker-manifest:` comment lines; this test checks the
declaration against the source text (the topic strings and settings really are there) and
against the ACL (with edge_broker.auth.acl's matcher)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ACL_FILE = ROOT / "deploy" / "edge-broker.acl.example"
EXAMPLES = ROOT / "firmware_examples"
DEVICE = "dev-a1b2c3d4e5f6"   # an id of the documented scheme (dev-<MAC>)
OTHER = "dev-0000000000ff"

# example -> (source declaring the manifest, settings the source must contain, as regexes)
SOURCES: dict[str, tuple[str, list[str]]] = {
    "micropython": ("main.py", [r"clean_session=False", r"qos=1", r"retain=True",
                                r"user=self\.id"]),
    "linux-c": ("device.c", [r"cleansession = 0", r"cleanstart = 0", r"msg\.qos = 1",
                             r"will\.retained = 1", r"opts\.username = c->id"]),
    "esp32-arduino": ("edge_device/edge_device.ino", [
        r"setCleanSession\(false\)", r"setWill\(topicStatus, \"offline\", true, 1\)",
        r"publish\(topicTelemetry, [^;]*, false, 1\)", r"connect\(deviceId, deviceId,",
        r"setCACert\("]),
    "esp-idf": ("main/main.c", [
        r"\.disable_clean_session = true", r"\.qos = 1, \.retain = 1",
        r"esp_mqtt_client_publish\(client, topic_telemetry, [^;]*, 0, 1, 0\)",
        r"\.credentials\.client_id = device_id", r"\.credentials\.username = device_id",
        r"\.broker\.verification\.certificate"]),
    "fleet-simulator": ("devices.py", [r"clean_session=False", r"qos=1, retain=True",
                                       r"username_pw_set\(self\.id\)"]),
}


def manifest(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in re.findall(r"edge-broker-manifest:(.*)", text):
        for key, value in re.findall(r"(\w+)=(\S+)", line):
            found.setdefault(key, []).append(value)
    return found


def topic_in_source(template: str, text: str) -> bool:
    """The topic is built in the source from the template, whatever the language's spelling."""
    spellings = ("%s", "{self.id}", "{device.id}")
    return any(f"devices/{s}/" + template.split("/", 2)[2] in text for s in spellings)


@pytest.fixture(scope="module")
def acl():  # type: ignore[no-untyped-def]
    module = pytest.importorskip("edge_broker.auth.acl")
    return module.Acl.load(ACL_FILE)


@pytest.mark.parametrize("example", sorted(SOURCES))
def test_example_declares_what_its_source_does(example: str) -> None:
    source, settings = SOURCES[example]
    text = (EXAMPLES / example / source).read_text()
    m = manifest(text)
    assert m["client_id"] == ["{id}"] and m["username"] == ["{id}"]
    assert m["clean_session"] == ["false"] and m["qos"] == ["1"] and m["retain"] == ["true"]
    assert int(m["keepalive"][0]) > 0
    for template in m["publish"] + m["will"] + m.get("subscribe", []):
        assert template.startswith("devices/{id}/"), template
        assert topic_in_source(template, text), f"{example}: {template} not in {source}"
    for pattern in settings:
        assert re.search(pattern, text), f"{example}: {source} lacks {pattern!r}"
    assert (EXAMPLES / example / "README.md").exists()


@pytest.mark.parametrize("example", sorted(SOURCES))
def test_example_topics_are_allowed_by_the_example_acl(acl, example: str) -> None:  # type: ignore[no-untyped-def]
    m = manifest((EXAMPLES / example / SOURCES[example][0]).read_text())
    who = {"username": DEVICE, "client_id": DEVICE}   # username = client id = device id
    for template in m["publish"] + m["will"]:         # the will is published for the device
        topic = template.replace("{id}", DEVICE)
        assert acl.can_publish(topic, **who), topic
        # ...and only under its own id
        assert not acl.can_publish(template.replace("{id}", OTHER), **who), template
    for template in m.get("subscribe", []):
        topic = template.replace("{id}", DEVICE)
        assert acl.can_subscribe(topic, **who), topic
        assert acl.can_read(topic, **who), topic
        assert not acl.can_subscribe(template.replace("{id}", OTHER), **who), template
        assert not acl.can_publish(topic, **who), f"a device must not command itself: {topic}"
    # A wide filter is granted when part of it is readable (its own commands), but every
    # delivery is checked: nothing of another device's reaches it.
    assert acl.can_subscribe("devices/#", **who)
    assert not acl.can_read(f"devices/{OTHER}/telemetry", **who)
    assert not acl.can_read(f"devices/{OTHER}/cmd", **who)
    assert not acl.can_subscribe(f"devices/{OTHER}/#", **who)


def test_central_reads_everything_and_only_commands(acl) -> None:  # type: ignore[no-untyped-def]
    who = {"username": "central", "client_id": "central"}
    assert acl.can_subscribe("devices/#", **who)
    assert acl.can_read(f"devices/{DEVICE}/telemetry", **who)
    assert acl.can_publish(f"devices/{DEVICE}/cmd", **who)
    assert not acl.can_publish(f"devices/{DEVICE}/telemetry", **who)
