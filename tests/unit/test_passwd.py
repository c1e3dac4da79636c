"""Password files in mosquitto's format and the off-loop verifier (edge_broker.auth)."""

from __future__ import annotations

import asyncio
import hashlib
import stat
import threading
from pathlib import Path

import pytest

from edge_broker.auth import passwd as passwd_module
from edge_broker.auth.passwd import PasswordFile, PasswordHash
from edge_broker.auth.verifier import PasswordVerifier, VerifierBusy
from edge_broker.errors import ConfigError

# Written by Debian's mosquitto_passwd 2.0.11: `mosquitto_passwd -c -b F alice secret`, then
# `mosquitto_passwd -H sha512 -b F bob pw` (the pre-2.0 format).
MOSQUITTO_7 = ("alice:$7$101$idRVoM7/Z2XUDaYO$Y8OVzbOCG30MuXoQYd9RIKPla6rDF7RrmCST0fyrv5f0E8Pa"
               "D/8Uvy+r0a/DxK/Fm/70MjWjwqcwyiJ68Hx4Rg==")
MOSQUITTO_6 = ("bob:$6$2h6C3wwntTjrkhZ0$6MLL40AYn3lhWmYHYP8MdwfmH4Ia57+xpu8Cq/UOlloIynJb4wORLVZQ"
               "1BE6XiSzzXl+ukpYYuSYxz/pKiFzfA==")


def mosquitto_file() -> PasswordFile:
    return PasswordFile.parse(f"# users\n{MOSQUITTO_7}\n\n{MOSQUITTO_6}\n", "passwd")


def test_reads_mosquitto_2_and_1_6_hashes() -> None:
    users = mosquitto_file()
    assert users.verify("alice", b"secret")
    assert users.verify("bob", b"pw")
    assert not users.verify("alice", b"Secret")
    assert not users.verify("bob", b"secret")
    assert not users.verify("alice", b"pw")


def test_new_hashes_are_mosquitto_7_format_salted() -> None:
    users = PasswordFile()
    users.set("dev1", "s3cret")
    users.set("dev2", "s3cret")
    first, second = (line.split(":", 1)[1] for line in users.dumps().splitlines())
    prefix, scheme, iterations, _salt, _digest = first.split("$")
    assert (prefix, scheme, iterations) == ("", "7", "101")
    parsed = PasswordHash.parse(first)
    assert len(parsed.salt) == 12 and len(parsed.digest) == 64
    assert parsed.digest == hashlib.pbkdf2_hmac("sha512", b"s3cret", parsed.salt, 101, 64)
    assert first != second  # same password, different salt
    assert users.verify("dev1", b"s3cret") and users.verify("dev2", "s3cret")


def test_scrypt_option_round_trips() -> None:
    users = PasswordFile()
    users.set("dev", b"pw", scheme="scrypt")
    line = users.dumps().strip()
    assert line.startswith("dev:$scrypt$14$8$1$")
    again = PasswordFile.parse(line)
    assert again.verify("dev", b"pw") and not again.verify("dev", b"pW")


def test_save_is_0600_keeps_comments_and_order(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    users = mosquitto_file()
    users.set("carol", "x")
    users.delete("alice")
    users.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# users\nbob:$6$")
    assert text.splitlines()[2].startswith("carol:$7$")
    again = PasswordFile.load(path)
    assert again.usernames() == ["bob", "carol"]
    assert again.verify("carol", b"x") and not again.verify("alice", b"secret")
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # no temporary file left


@pytest.mark.parametrize(("line", "message"), [
    ("alice", "expected 'username:hash'"),
    ("alice:plaintext", "not a hashed password"),
    ("alice:$7$101$!!!$AAAA", "not valid base64"),
    ("alice:$7$x$AAAA$AAAA", "malformed number"),
    ("alice:$7$99999999$AAAAAAAAAAAAAAAA$" + "A" * 88, "out of range"),
    ("alice:$7$101$AAAAAAAAAAAAAAAA$AAAA", "hash is 3 bytes"),
    ("alice:$5$abc$def", "unknown hash format"),
])
def test_bad_line_names_file_and_line_not_the_hash(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PasswordFile.parse(f"{MOSQUITTO_6}\n{line}\n", "/etc/edge-broker/passwd")
    text = str(caught.value)
    assert text.startswith("/etc/edge-broker/passwd: line 2")
    assert message in text
    hashed = line.partition(":")[2]
    assert not hashed or hashed not in text


def test_duplicate_user_and_invalid_utf8_are_refused() -> None:
    with pytest.raises(ConfigError, match="line 2: user 'alice' appears twice"):
        PasswordFile.parse(f"{MOSQUITTO_7}\n{MOSQUITTO_7}\n")
    with pytest.raises(ConfigError, match="line 2: not valid UTF-8"):
        PasswordFile.parse(MOSQUITTO_7.encode() + b"\n\xff:x\n")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="passwd: cannot read the password file"):
        PasswordFile.load(tmp_path / "passwd")


@pytest.mark.parametrize("username", ["", "a:b", "a\nb", "#a", " a"])
def test_set_refuses_usernames_a_line_cannot_hold(username: str) -> None:
    with pytest.raises(ValueError, match="Username"):
        PasswordFile().set(username, "pw")


ODD = [None, "", b"", "x" * 65536, b"\xff" * 65536, b"\xc3\x28", "\ud800", b"\x00"]


@pytest.mark.parametrize("username", ODD)
@pytest.mark.parametrize("password", ODD)
def test_odd_credentials_answer_false_without_raising(username: object,
                                                      password: object) -> None:
    users = mosquitto_file()
    assert users.verify(username, password) is False  # type: ignore[arg-type]


def test_binary_and_long_passwords_work() -> None:
    users = PasswordFile()
    users.set("dev", b"\xff\x00" * 32768)
    assert users.verify("dev", b"\xff\x00" * 32768)
    assert not users.verify("dev", b"\xff\x00" * 32767)


def test_unknown_user_costs_a_hash_like_a_wrong_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    users = mosquitto_file()
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int,
                 dklen: int | None = None) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations, dklen)

    monkeypatch.setattr(passwd_module.hashlib, "pbkdf2_hmac", counting)
    assert not users.verify("alice", b"wrong")
    wrong_password = list(calls)
    calls.clear()
    assert not users.verify("mallory", b"wrong")
    assert not users.verify(b"\xff", b"wrong")
    assert wrong_password == [101]
    assert calls == [101, 101]


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = passwd_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(passwd_module.hmac, "compare_digest", spy)
    assert mosquitto_file().verify("alice", b"secret")
    assert len(seen) == 1


# --------------------------------------------------------------------------- the verifier


async def test_verifier_hashes_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    users = mosquitto_file()
    threads: list[threading.Thread] = []
    real = PasswordFile.verify

    def recording(self: PasswordFile, username: object, password: object) -> bool:
        threads.append(threading.current_thread())
        return real(self, username, password)  # type: ignore[arg-type]

    monkeypatch.setattr(PasswordFile, "verify", recording)
    verifier = PasswordVerifier(users, max_workers=2)
    try:
        results = await asyncio.gather(*(verifier.verify("alice", b"secret" if i % 2 else b"x")
                                         for i in range(20)))
    finally:
        verifier.close()
    assert results == [bool(i % 2) for i in range(20)]
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert len({t.name for t in threads}) <= 2


async def test_successes_are_cached_failures_are_not() -> None:
    verifier = PasswordVerifier(mosquitto_file())
    try:
        assert await verifier.verify("alice", b"secret")
        assert await verifier.verify("alice", b"secret")
        assert await verifier.verify("alice", "secret")
        assert (verifier.hashes_computed, verifier.cache_hits) == (1, 2)
        assert not await verifier.verify("alice", b"nope")
        assert not await verifier.verify("alice", b"nope")
        assert verifier.hashes_computed == 3
        assert not await verifier.verify("bob", b"secret")  # the cache is per user
    finally:
        verifier.close()


async def test_a_thousand_devices_at_once() -> None:
    users = PasswordFile()
    for index in range(1000):
        users.set(f"dev{index}", f"pw{index}")
    verifier = PasswordVerifier(users, max_workers=2, max_pending=1000)
    try:
        for _ in range(2):  # a reconnect storm, then the same devices again
            results = await asyncio.gather(*(verifier.verify(f"dev{i}", f"pw{i}".encode())
                                             for i in range(1000)))
            assert all(results)
        assert verifier.hashes_computed == 1000
        assert verifier.cache_hits == 1000
    finally:
        verifier.close()


async def test_reload_forgets_cached_successes() -> None:
    verifier = PasswordVerifier(mosquitto_file())
    try:
        assert await verifier.verify("alice", b"secret")
        changed = mosquitto_file()
        changed.set("alice", "rotated")
        verifier.replace(changed)
        assert not await verifier.verify("alice", b"secret")
        assert await verifier.verify("alice", b"rotated")
    finally:
        verifier.close()


async def test_cache_is_bounded() -> None:
    users = PasswordFile()
    for index in range(5):
        users.set(f"u{index}", "pw")
    verifier = PasswordVerifier(users, cache_size=2)
    try:
        for index in range(5):
            assert await verifier.verify(f"u{index}", b"pw")
        assert await verifier.verify("u4", b"pw") and await verifier.verify("u3", b"pw")
        assert verifier.cache_hits == 2
        assert await verifier.verify("u0", b"pw")
        assert verifier.cache_hits == 2  # evicted: hashed again
    finally:
        verifier.close()


async def test_too_many_waiting_checks_are_refused_not_queued(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = PasswordFile.verify

    def slow(self: PasswordFile, username: object, password: object) -> bool:
        release.wait(timeout=30)
        return real(self, username, password)  # type: ignore[arg-type]

    monkeypatch.setattr(PasswordFile, "verify", slow)
    verifier = PasswordVerifier(mosquitto_file(), max_workers=1, max_pending=3)
    try:
        waiting = [asyncio.ensure_future(verifier.verify("alice", b"secret"))
                   for _ in range(3)]
        await asyncio.sleep(0)
        assert verifier.pending == 3
        with pytest.raises(VerifierBusy):
            await verifier.verify("alice", b"secret")
        release.set()
        assert await asyncio.gather(*waiting) == [True, True, True]
        assert verifier.pending == 0
    finally:
        release.set()
        verifier.close()
