"""Authentication and authorisation: mosquitto-format password and ACL files.

The server uses them through server/gate.py (see docs/security.md). `passwd` and `acl` do no
I/O on the event loop; `PasswordVerifier.verify` is the one coroutine here (it hands the
hashing to a bounded thread pool).
"""

from __future__ import annotations

from edge_broker.auth.acl import Acl
from edge_broker.auth.identity import common_name
from edge_broker.auth.passwd import PasswordFile
from edge_broker.auth.verifier import PasswordVerifier, VerifierBusy

__all__ = ["Acl", "PasswordFile", "PasswordVerifier", "VerifierBusy", "common_name"]
