"""Password checks off the event loop: a bounded thread pool and a cache of recent successes.

PBKDF2 and scrypt cost milliseconds of CPU each: 1,000 devices reconnecting at once would stall
every connected client if the hashing ran on the event loop. `PasswordVerifier.verify` hands it
to a pool of `max_workers` threads (hashlib releases the GIL while hashing); at most
`max_pending` checks wait for it, beyond that `VerifierBusy` is raised so that the server can
answer CONNECT with "server busy" (0x89 on 5.0, 0x03 on 3.1.1) instead of queueing forever.

Successes are cached (LRU, `cache_size` entries) under (username, HMAC-SHA256 of the password
with a key drawn at start-up): a reconnecting device skips the hash, the cache never holds a
password or its unsalted hash, and failures are never cached (guessing costs a hash each time).
`replace` (a reload of the file) empties the cache.

This module is the one place in auth/ that uses asyncio (`loop.run_in_executor`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from edge_broker.auth.passwd import PasswordFile, _as_bytes, _as_text


class VerifierBusy(Exception):
    """More than `max_pending` password checks are waiting: refuse this CONNECT for now."""


class PasswordVerifier:
    def __init__(self, passwords: PasswordFile, *, max_workers: int = 2,
                 max_pending: int = 1000, cache_size: int = 1024) -> None:
        if max_workers < 1 or max_pending < 1 or cache_size < 0:
            raise ValueError("max_workers and max_pending must be >= 1, cache_size >= 0")
        self._passwords = passwords
        self._generation = 0
        self._max_pending = max_pending
        self._pending = 0
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._executor = ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="edge-broker-auth")
        self.cache_hits = 0
        self.hashes_computed = 0

    @property
    def passwords(self) -> PasswordFile:
        return self._passwords

    @property
    def pending(self) -> int:
        return self._pending

    def replace(self, passwords: PasswordFile) -> None:
        """Use a re-read file from now on; cached successes are forgotten."""
        with self._lock:
            self._passwords = passwords
            self._generation += 1
            self._cache.clear()

    def _cache_key(self, username: str | bytes | None,
                   password: str | bytes | None) -> tuple[str, bytes] | None:
        name, secret = _as_text(username), _as_bytes(password)
        if name is None or secret is None:
            return None
        return name, hmac.new(self._key, secret, hashlib.sha256).digest()

    def _cached(self, key: tuple[str, bytes] | None) -> bool:
        if key is None:
            return False
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return True
        return False

    def _check(self, passwords: PasswordFile, generation: int, key: tuple[str, bytes] | None,
               username: str | bytes | None, password: str | bytes | None) -> bool:
        ok = passwords.verify(username, password)
        with self._lock:
            self.hashes_computed += 1
            if (ok and key is not None and self._cache_size
                    and generation == self._generation):
                self._cache[key] = None
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return ok

    def verify_blocking(self, username: str | bytes | None,
                        password: str | bytes | None) -> bool:
        """The same check on the calling thread (for tools and tests, not the event loop)."""
        key = self._cache_key(username, password)
        if self._cached(key):
            return True
        with self._lock:
            passwords, generation = self._passwords, self._generation
        return self._check(passwords, generation, key, username, password)

    async def verify(self, username: str | bytes | None, password: str | bytes | None) -> bool:
        """True when the password is right. Raises VerifierBusy when too many checks wait."""
        key = self._cache_key(username, password)
        if self._cached(key):
            return True
        if self._pending >= self._max_pending:
            raise VerifierBusy(f"{self._pending} password checks already waiting")
        with self._lock:
            passwords, generation = self._passwords, self._generation
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._check, passwords,
                                              generation, key, username, password)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
