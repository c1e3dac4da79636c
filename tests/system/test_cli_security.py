"""`edge-broker passwd`: behaviour like mosquitto_passwd, and files that mosquitto and
edge-broker both read (Debian's mosquitto 2 and mosquitto_passwd, when installed)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_broker import cli
from edge_broker.auth.passwd import PasswordFile

TIMEOUT_S = 20
INSTALL = "sudo apt-get install mosquitto mosquitto-clients"
needs_mosquitto_passwd = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason=f"mosquitto_passwd not found: {INSTALL}")


def stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def prompts(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    asked: list[str] = []
    replies = iter(answers)

    def getpass(prompt: str = "Password: ") -> str:
        asked.append(prompt)
        return next(replies)

    monkeypatch.setattr("getpass.getpass", getpass)
    return asked


def passwd(*args: str) -> int:
    return cli.main(["passwd", *args])


# --------------------------------------------------------------------------- the command


def test_prompts_twice_and_writes_a_private_mosquitto_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    asked = prompts(monkeypatch, "s3cret", "s3cret")
    assert passwd("-c", str(path), "dev1") == 0
    assert asked == ["Password: ", "Reenter password: "]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("dev1:$7$101$")
    assert PasswordFile.load(path).verify("dev1", b"s3cret")


def test_password_from_stdin_adds_and_updates(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    stdin(monkeypatch, b"one\n")
    assert passwd("-c", "--password-stdin", str(path), "a") == 0
    stdin(monkeypatch, b"two\r\n")
    assert passwd("--password-stdin", str(path), "b") == 0
    stdin(monkeypatch, b"\xffthree")  # not UTF-8, no newline: taken as is
    assert passwd("--password-stdin", str(path), "a") == 0
    users = PasswordFile.load(path)
    assert users.usernames() == ["a", "b"]
    assert users.verify("a", b"\xffthree") and users.verify("b", b"two")


def test_an_update_keeps_the_group_that_lets_the_broker_read_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # deploy/README.md: `chgrp edge-broker passwd; chmod 0640 passwd`, so that the service's
    # user reads it. Adding a user later must not make it root's alone again (0600): the
    # next reload would keep the old passwords and the next restart fail. Before, it did.
    path = tmp_path / "passwd"
    stdin(monkeypatch, b"one\n")
    assert passwd("-c", "--password-stdin", str(path), "a") == 0
    group = 65534 if os.geteuid() == 0 else os.getgid()  # nogroup, as root (CI)
    os.chown(path, -1, group)
    path.chmod(0o640)
    stdin(monkeypatch, b"two\n")
    assert passwd("--password-stdin", str(path), "b") == 0
    after = path.stat()
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (0o640, group)
    assert PasswordFile.load(path).usernames() == ["a", "b"]
    path.chmod(0o644)  # readable by everyone: the rewrite does not keep that
    stdin(monkeypatch, b"three\n")
    assert passwd("--password-stdin", str(path), "c") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_scrypt_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    stdin(monkeypatch, b"pw\n")
    assert passwd("-c", "--scrypt", "--password-stdin", str(path), "a") == 0
    assert path.read_text().startswith("a:$scrypt$")
    assert PasswordFile.load(path).verify("a", b"pw")


def test_c_replaces_the_file_and_d_deletes(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    for user in ("a", "b"):
        stdin(monkeypatch, b"pw\n")
        assert passwd("--password-stdin", "-c" if user == "a" else "--scrypt", str(path),
                      user) == 0
    assert passwd("-D", str(path), "a") == 0
    assert PasswordFile.load(path).usernames() == ["b"]
    stdin(monkeypatch, b"pw\n")
    assert passwd("-c", "--password-stdin", str(path), "c") == 0
    assert PasswordFile.load(path).usernames() == ["c"]


@pytest.mark.parametrize(("setup", "args", "stdin_data", "answers", "message"), [
    (False, ["{f}", "u"], None, ("a", "a"),
     "Error: Unable to open password file {f}. No such file or directory.\n"),
    (True, ["{f}", "u"], None, ("a", "b"), "Error: Passwords do not match.\n"),
    (True, ["{f}", "u"], None, ("", ""), "Error: Empty password.\n"),
    (True, ["--password-stdin", "{f}", "u"], b"\n", (), "Error: Empty password.\n"),
    (True, ["-D", "{f}", "ghost"], None, (),
     "Warning: User ghost not found in password file.\n"),
    (True, ["-c", "{f}", "a:b"], None, ("a", "a"),
     "Error: Username must not contain the ':' character.\n"),
])
def test_failures_exit_1_with_mosquitto_passwd_messages_and_change_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        setup: bool, args: list[str], stdin_data: bytes | None, answers: tuple[str, ...],
        message: str) -> None:
    path = tmp_path / "passwd"
    if setup:
        stdin(monkeypatch, b"pw\n")
        assert passwd("-c", "--password-stdin", str(path), "keep") == 0
        before = path.read_bytes()
    if stdin_data is not None:
        stdin(monkeypatch, stdin_data)
    prompts(monkeypatch, *answers)
    capsys.readouterr()
    assert passwd(*(a.format(f=path) for a in args)) == 1
    assert capsys.readouterr().err == message.format(f=path)
    if setup:
        assert path.read_bytes() == before
    else:
        assert not path.exists()


def test_a_broken_file_is_reported_with_its_line(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "passwd"
    path.write_text("a:$7$101$AAAA\n")
    assert passwd("-D", str(path), "a") == 1
    assert capsys.readouterr().err.startswith(f"Error: {path}: line 1 (user 'a'):")
    assert path.read_text() == "a:$7$101$AAAA\n"


def test_c_and_d_together_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        passwd("-c", "-D", str(tmp_path / "p"), "u")
    assert caught.value.code == 2


# --------------------------------------------------------------------------- with mosquitto


@needs_mosquitto_passwd
def test_a_file_written_by_mosquitto_passwd_is_read_as_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "passwd"
    for args in (["-c", "-b", str(path), "alice", "secret"],
                 ["-H", "sha512", "-b", str(path), "bob", "pw"],
                 ["-b", str(path), "carol", "ü-ñ €"]):
        subprocess.run(["mosquitto_passwd", *args], check=True, timeout=TIMEOUT_S)
    written = path.read_text().splitlines()
    users = PasswordFile.load(path)
    assert users.verify("alice", b"secret") and users.verify("bob", b"pw")
    assert users.verify("carol", "ü-ñ €".encode())
    assert not users.verify("alice", b"pw")
    stdin(monkeypatch, b"new\n")
    assert passwd("--password-stdin", str(path), "dave") == 0
    assert path.read_text().splitlines()[:3] == written  # others' lines kept as they were


@needs_mosquitto_passwd
@pytest.mark.parametrize("case", ["missing file", "absent user", "colon"])
def test_exit_codes_match_mosquitto_passwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           case: str) -> None:
    path = tmp_path / "passwd"
    if case != "missing file":
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "keep", "pw"], check=True,
                       timeout=TIMEOUT_S)
    theirs = {"missing file": ["-b", str(path), "u", "pw"],
              "absent user": ["-D", str(path), "ghost"],
              "colon": ["-b", str(path), "a:b", "pw"]}[case]
    ours = {"missing file": ["--password-stdin", str(path), "u"],
            "absent user": ["-D", str(path), "ghost"],
            "colon": ["--password-stdin", str(path), "a:b"]}[case]
    expected = subprocess.run(["mosquitto_passwd", *theirs], capture_output=True,
                              timeout=TIMEOUT_S).returncode
    stdin(monkeypatch, b"pw\n")
    assert passwd(*ours) == expected == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """mosquitto on 127.0.0.1 with allow_anonymous false and tmp_path/passwd."""
    for binary in ("mosquitto", "mosquitto_pub"):
        if shutil.which(binary) is None and not Path("/usr/sbin/mosquitto").exists():
            pytest.skip(f"{binary} not found: {INSTALL}")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    password_file = tmp_path / "passwd"
    stdin_data = io.TextIOWrapper(io.BytesIO(b"pw-1\n"))
    old = sys.stdin
    sys.stdin = stdin_data
    try:
        assert passwd("-c", "--password-stdin", str(password_file), "dev1") == 0
    finally:
        sys.stdin = old
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous false",
             f"password_file {password_file}", "log_dest stderr", "persistence false"]
    if os.geteuid() == 0:
        lines.append("user root")  # else mosquitto drops to 'mosquitto', which cannot read 0600
    config.write_text("\n".join(lines) + "\n")
    log = (tmp_path / "mosquitto.log").open("wb")
    proc = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mosquitto did not start:\n"
                                f"{(tmp_path / 'mosquitto.log').read_text()}")
                time.sleep(0.05)  # polling for the port with a deadline
        yield port, password_file
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT_S)
        log.close()


def mosquitto_pub(port: int, *credentials: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "t",
                           "-m", "m", "-q", "1", *credentials], capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None,
                    reason=f"mosquitto_pub not found: {INSTALL}")
def test_mosquitto_accepts_a_file_written_by_edge_broker(mosquitto: tuple[int, Path]) -> None:
    port, _ = mosquitto
    assert mosquitto_pub(port, "-u", "dev1", "-P", "pw-1").returncode == 0
    refused = mosquitto_pub(port, "-u", "dev1", "-P", "wrong")
    assert refused.returncode != 0 and "not authori" in refused.stderr.lower()
    assert mosquitto_pub(port, "-u", "nobody", "-P", "pw-1").returncode != 0
    assert mosquitto_pub(port).returncode != 0  # anonymous


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv (util-linux) to act as another user")
def test_a_rewrite_never_gives_the_group_bits_to_another_group() -> None:
    # Run by a user who is not in the file's group, the rewrite cannot keep that group; the
    # new file is then in the user's own group, which must not get the group's read bit (the
    # hashes would become readable by that group). Before, it did.
    directory = Path(tempfile.mkdtemp(prefix="edge-passwd-"))  # reachable by that user
    directory.chmod(0o777)
    try:
        check_rewrite_as_another_user(directory / "passwd")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def check_rewrite_as_another_user(path: Path) -> None:
    path.write_text("a:x\n")
    os.chown(path, 65534, 42)  # nobody, group shadow
    path.chmod(0o640)
    script = ("import sys; from pathlib import Path; from edge_broker.auth.files import "
              "write_atomic; write_atomic(Path(sys.argv[1]), b'a:y\\n', mode=0o600)")
    subprocess.run(["setpriv", "--reuid=65534", "--regid=100", "--clear-groups",
                    sys.executable, "-c", script, str(path)], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    after = path.stat()
    assert after.st_gid == 100 and stat.S_IMODE(after.st_mode) == 0o600
