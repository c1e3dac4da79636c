"""Password files in mosquitto's format, one `username:hash` a line.

Hash formats read (and written):

- `$7$<iterations>$<salt>$<hash>`: mosquitto 2's default, PBKDF2-HMAC-SHA512 of the password
  with a 12-byte salt, 64-byte result, both standard base64 (checked against Debian's
  `mosquitto_passwd` 2.0.11). Written by default, with 101 iterations like mosquitto, so that
  mosquitto can read a file edge-broker wrote.
- `$6$<salt>$<hash>`: mosquitto 1.6 and earlier (`mosquitto_passwd -H sha512`): SHA-512 of
  password + salt. Read only; `set` never writes it.
- `$scrypt$<log2 N>$<r>$<p>$<salt>$<hash>`: edge-broker's own (mosquitto cannot read it),
  scrypt with a 16-byte salt and a 64-byte result, standard base64.

Comparisons are constant-time (hmac.compare_digest) and an unknown user is checked against a
dummy `$7$` hash, so that it costs what a wrong password costs. Usernames and passwords may be
any bytes (empty, 64 KB, invalid UTF-8): `verify` answers False, it never raises for them.
Errors name the file and line and never echo a hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from edge_broker.auth.files import write_atomic
from edge_broker.errors import ConfigError

Scheme = Literal["7", "6", "scrypt"]

DEFAULT_ITERATIONS: Final = 101
"""mosquitto 2's PBKDF2 iteration count (mosquitto reads the count from each line)."""
MAX_ITERATIONS: Final = 1_000_000
"""A file asking for more is refused at load: each login would cost seconds of CPU."""
PBKDF2_SALT_BYTES: Final = 12
SCRYPT_SALT_BYTES: Final = 16
HASH_BYTES: Final = 64
SCRYPT_LOG2_N: Final = 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SCRYPT_MAX_LOG2_N: Final = 20
_SCRYPT_MAX_R: Final = 32
_SCRYPT_MAX_P: Final = 16


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _number(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise ValueError("malformed number in the hash")
    return int(text)


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One stored hash. `parse` and `encode` round-trip."""

    scheme: Scheme
    salt: bytes
    digest: bytes
    iterations: int = DEFAULT_ITERATIONS
    """PBKDF2 iterations ($7$ only)."""
    log2_n: int = SCRYPT_LOG2_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def new(cls, password: bytes, *, scheme: Scheme = "7",
            iterations: int = DEFAULT_ITERATIONS) -> PasswordHash:
        if scheme == "6":
            raise ValueError("$6$ (plain salted SHA-512) is read but never written: too weak")
        salt = secrets.token_bytes(SCRYPT_SALT_BYTES if scheme == "scrypt"
                                   else PBKDF2_SALT_BYTES)
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be 1..{MAX_ITERATIONS}")
        template = cls(scheme=scheme, salt=salt, digest=b"", iterations=iterations)
        return cls(scheme=scheme, salt=salt, digest=template.compute(password),
                   iterations=iterations)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Raises ValueError with a message that does not contain `text`."""
        parts = text.split("$")
        if len(parts) < 2 or parts[0] != "":
            raise ValueError("not a hashed password (mosquitto_passwd -U converts a plain "
                             "text file)")
        try:
            if parts[1] == "7" and len(parts) == 5:
                iterations = _number(parts[2])
                if not 1 <= iterations <= MAX_ITERATIONS:
                    raise ValueError(f"$7$ iteration count out of range 1..{MAX_ITERATIONS}")
                return cls._checked("7", _unb64(parts[3]), _unb64(parts[4]),
                                    iterations=iterations)
            if parts[1] == "6" and len(parts) == 4:
                return cls._checked("6", _unb64(parts[2]), _unb64(parts[3]))
            if parts[1] == "scrypt" and len(parts) == 7:
                log2_n, r, p = _number(parts[2]), _number(parts[3]), _number(parts[4])
                if not (1 <= log2_n <= _SCRYPT_MAX_LOG2_N and 1 <= r <= _SCRYPT_MAX_R
                        and 1 <= p <= _SCRYPT_MAX_P):
                    raise ValueError("$scrypt$ parameters out of range")
                return cls._checked("scrypt", _unb64(parts[5]), _unb64(parts[6]),
                                    log2_n=log2_n, r=r, p=p)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("salt or hash is not valid base64") from None
        raise ValueError("unknown hash format (expected $7$, $6$ or $scrypt$ with the right "
                         "number of fields)")

    @classmethod
    def _checked(cls, scheme: Scheme, salt: bytes, digest: bytes, **params: int) -> PasswordHash:
        if not salt:
            raise ValueError("empty salt")
        if len(digest) != HASH_BYTES:
            raise ValueError(f"hash is {len(digest)} bytes, expected {HASH_BYTES}")
        return cls(scheme=scheme, salt=salt, digest=digest, **params)

    def compute(self, password: bytes) -> bytes:
        if self.scheme == "7":
            return hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations,
                                       HASH_BYTES)
        if self.scheme == "6":
            return hashlib.sha512(password + self.salt).digest()
        n = 1 << self.log2_n
        return hashlib.scrypt(password, salt=self.salt, n=n, r=self.r, p=self.p,
                              maxmem=256 * n * self.r * self.p + (1 << 20), dklen=HASH_BYTES)

    def matches(self, password: bytes) -> bool:
        return hmac.compare_digest(self.compute(password), self.digest)

    def encode(self) -> str:
        if self.scheme == "7":
            return f"$7${self.iterations}${_b64(self.salt)}${_b64(self.digest)}"
        if self.scheme == "6":
            return f"$6${_b64(self.salt)}${_b64(self.digest)}"
        return (f"$scrypt${self.log2_n}${self.r}${self.p}$"
                f"{_b64(self.salt)}${_b64(self.digest)}")


_DUMMY: PasswordHash | None = None


def _dummy() -> PasswordHash:
    # A hash nobody knows the password of, with the default parameters: what an unknown user
    # is checked against so that it costs what a known user with a wrong password costs.
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = PasswordHash.new(secrets.token_bytes(16))
    return _DUMMY


def _as_bytes(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None


def _as_text(value: str | bytes | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def check_username(username: str) -> None:
    """Raise ValueError when `username` cannot be stored in a password file line."""
    if not username:
        raise ValueError("Username must not be empty.")
    if ":" in username:
        raise ValueError("Username must not contain the ':' character.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in username):
        raise ValueError("Username must not contain control characters.")
    if username.startswith("#"):
        raise ValueError("Username must not start with '#' (the line would be a comment).")
    if username != username.strip():
        raise ValueError("Username must not start or end with white space.")


class PasswordFile:
    """The users of one password file. Not thread-safe for writes; `verify` only reads."""

    def __init__(self) -> None:
        self._users: dict[str, PasswordHash] = {}
        # The file's lines in order: ("user", name) or ("comment", text), so that a
        # rewrite keeps comments and order.
        self._lines: list[tuple[str, str]] = []

    @classmethod
    def load(cls, path: str | Path) -> PasswordFile:
        source = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the password file: {exc.strerror}",
                              file=source) from None
        return cls.parse(data, source)

    @classmethod
    def parse(cls, data: bytes | str, source: str = "<passwd>") -> PasswordFile:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        result = cls()
        for number, raw_line in enumerate(raw.split(b"\n"), start=1):
            try:
                line = raw_line.decode("utf-8").rstrip()
            except UnicodeDecodeError:
                raise ConfigError(f"line {number}: not valid UTF-8", file=source) from None
            if not line.strip() or line.lstrip().startswith("#"):
                if line.strip():
                    result._lines.append(("comment", line))
                continue
            username, colon, hashed = line.partition(":")
            if not colon or not username:
                raise ConfigError(f"line {number}: expected 'username:hash'", file=source)
            if username in result._users:
                raise ConfigError(f"line {number}: user {username!r} appears twice",
                                  file=source)
            try:
                result._users[username] = PasswordHash.parse(hashed)
            except ValueError as exc:
                raise ConfigError(f"line {number} (user {username!r}): {exc}",
                                  file=source) from None
            result._lines.append(("user", username))
        return result

    def __contains__(self, username: object) -> bool:
        return username in self._users

    def __len__(self) -> int:
        return len(self._users)

    def usernames(self) -> list[str]:
        return [name for kind, name in self._lines if kind == "user"]

    def verify(self, username: str | bytes | None, password: str | bytes | None) -> bool:
        """True when `password` is `username`'s. Never raises for odd input; an unknown user,
        a missing password or undecodable bytes cost one hash like a wrong password."""
        name = _as_text(username)
        secret = _as_bytes(password)
        stored = self._users.get(name) if name is not None else None
        if stored is None or secret is None:
            _dummy().matches(secret if secret is not None else b"")
            return False
        return stored.matches(secret)

    def hash_of(self, username: str) -> PasswordHash | None:
        return self._users.get(username)

    def set(self, username: str, password: str | bytes, *, scheme: Scheme = "7",
            iterations: int = DEFAULT_ITERATIONS) -> None:
        """Add or replace `username`'s password. ValueError for a username a line cannot hold."""
        check_username(username)
        secret = _as_bytes(password)
        if secret is None:
            raise ValueError("Password is not valid text.")
        if username not in self._users:
            self._lines.append(("user", username))
        self._users[username] = PasswordHash.new(secret, scheme=scheme, iterations=iterations)

    def delete(self, username: str) -> bool:
        """Remove `username`; False if it was not there."""
        if self._users.pop(username, None) is None:
            return False
        self._lines.remove(("user", username))
        return True

    def dumps(self) -> str:
        out = []
        for kind, value in self._lines:
            out.append(value if kind == "comment" else f"{value}:{self._users[value].encode()}")
        return "".join(line + "\n" for line in out)

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, fsync, rename), mode 0600."""
        write_atomic(Path(path), self.dumps().encode("utf-8"), mode=0o600)
