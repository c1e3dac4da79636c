"""TLS for listeners: the server `ssl.SSLContext` built from a listener's settings, the
client certificate's identity, and a reload that swaps certificates and CRL for new
connections.

`ServerTls(listener, label, file)` builds the context that `create_server` gets. TLS 1.2 is
the minimum, always. `require_certificate` makes the client certificate mandatory
(CERT_REQUIRED, chained to `cafile`); `crlfile` adds the CRL and VERIFY_CRL_CHECK_LEAF (the
client certificate is checked, not the CAs above it). `crlfile` may hold several PEM CRLs (one
per CA in `cafile`): OpenSSL loads them all, and so does `load_crl_revocations`, which keys each
revoked serial by the issuer of its CRL (a serial is unique per CA only).

Reload. A server's SSLContext is fixed when `create_server` returns, so the context given to
it (`ServerTls.context`) only picks, for each new handshake, the newest context: its SNI
callback runs on every ClientHello (with or without a server name) and moves the connection
to `ServerTls.current` before the server certificate is chosen and the client certificate
verified. `reload()` builds a new context from the same files and makes it current; a
connection already open keeps the context it was made with. Listener settings themselves
(which files, require_certificate) are read at start-up only.

Session resumption is off (no session tickets), so every connection presents its
certificate to the CRL of the moment.

`peer_common_name(transport)` is the subject CN of the client certificate the handshake
verified (None without one): what `use_identity_as_username` uses as the username.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

    from ..config import ListenerConfig

    # What a CRL file revokes: (issuer of the CRL, serial number) pairs.
    Revocations = frozenset[tuple[x509.Name, int]]

log = logging.getLogger("edge_broker")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
HANDSHAKE_TIMEOUT_S = 10.0  # a TLS handshake not finished within this is aborted


def _error(message: str, *, label: str, key: str, file: str | None) -> ConfigError:
    error = ConfigError(f"{label} {key}: {message}", file=file)
    error.table = label
    error.key = key
    return error


def _reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and getattr(error, "reason", None):
        # (set_ciphers raises one without reason or library)
        return f"{error.reason} ({error.library or 'ssl'})"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


_PEM_CRL_BEGIN = b"-----BEGIN X509 CRL-----"
_PEM_CRL_END = b"-----END X509 CRL-----"


def _crl_blocks(data: bytes) -> list[bytes] | None:
    """The PEM CRL blocks of a file, in order (None: no PEM CRL, so DER). A BEGIN line
    without its END line (a truncated file) is a ValueError."""
    if _PEM_CRL_BEGIN not in data:
        return None
    blocks: list[bytes] = []
    begin = data.find(_PEM_CRL_BEGIN)
    while begin != -1:
        end = data.find(_PEM_CRL_END, begin)
        following = data.find(_PEM_CRL_BEGIN, begin + len(_PEM_CRL_BEGIN))
        if end == -1 or (following != -1 and following < end):
            raise ValueError(f"CRL {len(blocks) + 1} has no END X509 CRL line (truncated?)")
        blocks.append(data[begin:end + len(_PEM_CRL_END)] + b"\n")
        begin = following
    return blocks


def load_crl_revocations(path: str, *, label: str, file: str | None) -> Revocations:
    """What a CRL file revokes, as (CRL issuer, serial number) pairs: every CRL of a PEM file
    (one per CA, as OpenSSL loads them), or the one CRL of a DER file. Warns about each CRL
    that is out of date. Raises ConfigError naming the file when one does not parse."""
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise _error(f"cannot read {path!r}: {_reason(error)}", label=label, key="crlfile",
                     file=file) from None
    crls: list[x509.CertificateRevocationList] = []
    try:
        blocks = _crl_blocks(data)
        if blocks is None:
            crls.append(x509.load_der_x509_crl(data))
    except ValueError as error:
        raise _error(f"{path!r} is not a certificate revocation list (PEM or DER): {error}",
                     label=label, key="crlfile", file=file) from None
    pem = blocks or []
    for number, block in enumerate(pem, 1):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError as error:
            raise _error(f"CRL {number} of {len(pem)} in {path!r} is not a valid "
                         f"certificate revocation list: {error}", label=label, key="crlfile",
                         file=file) from None
    now = datetime.datetime.now(datetime.UTC)
    revoked: set[tuple[x509.Name, int]] = set()
    for crl in crls:
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now:
            log.warning("%s crlfile: the CRL of %s in %s expired on %s; OpenSSL refuses every "
                        "client certificate of that CA until a fresh CRL is installed "
                        "(edge-broker certs revoke writes one) and the broker reloads it "
                        "(SIGHUP)", label, crl.issuer.rfc4514_string(), path,
                        next_update.isoformat())
        revoked.update((crl.issuer, entry.serial_number) for entry in crl)
    return frozenset(revoked)


def build_context(listener: ListenerConfig, *, label: str,
                  file: str | None) -> tuple[ssl.SSLContext, Revocations | None]:
    """A server context from a TLS listener's settings, and what its CRLs revoke.

    Raises ConfigError naming the listener and the key whose file does not load.
    """
    assert listener.certfile is not None and listener.keyfile is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if listener.tls_version == "tlsv1.3"
                               else MINIMUM_VERSION)
    if listener.ciphers is not None:
        try:
            context.set_ciphers(listener.ciphers)  # TLS 1.2's; 1.3's are OpenSSL's own
        except ssl.SSLError as error:
            raise _error(f"OpenSSL takes no cipher from {listener.ciphers!r}: "
                         f"{_reason(error)}", label=label, key="ciphers", file=file) from None
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    context.num_tickets = 0  # TLS 1.3: no resumption, so no handshake skips the CRL
    try:
        context.load_cert_chain(str(listener.certfile), str(listener.keyfile))
    except (ssl.SSLError, OSError) as error:
        key = "keyfile" if "KEY_VALUES_MISMATCH" in str(error) else "certfile"
        raise _error(f"cannot use {str(listener.certfile)!r} with {str(listener.keyfile)!r} "
                     f"as the server certificate and its key: {_reason(error)}",
                     label=label, key=key, file=file) from None
    if listener.cafile is not None:
        try:
            context.load_verify_locations(cafile=str(listener.cafile))
        except (ssl.SSLError, OSError) as error:
            raise _error(f"cannot load CA certificates from {str(listener.cafile)!r}: "
                         f"{_reason(error)}", label=label, key="cafile", file=file) from None
    context.verify_mode = ssl.CERT_REQUIRED if listener.require_certificate else ssl.CERT_NONE
    revoked: Revocations | None = None
    if listener.crlfile is not None:
        revoked = load_crl_revocations(str(listener.crlfile), label=label, file=file)
        try:
            context.load_verify_locations(cafile=str(listener.crlfile))
        except (ssl.SSLError, OSError) as error:
            raise _error(f"cannot load the CRL {str(listener.crlfile)!r}: {_reason(error)}",
                         label=label, key="crlfile", file=file) from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context, revoked


class ServerTls:
    """The TLS side of one listener: the server's context and the current one."""

    def __init__(self, listener: ListenerConfig, label: str, file: str | None) -> None:
        self.listener = listener
        self.label = label
        self.file = file
        self.context, self.revoked = build_context(listener, label=label, file=file)
        self.current = self.context
        self.context.sni_callback = self._select_context

    def _select_context(self, ssl_object: Any, server_name: str | None,
                        context: ssl.SSLContext) -> None:
        current = self.current
        if current is not context:
            ssl_object.context = current  # the newest certificates and CRL (reload)

    def reload(self) -> None:
        """Read the certificate, key, CA and CRL files again; new connections use them.

        Raises ConfigError (and keeps the current context) when a file does not load.
        """
        self.current, self.revoked = build_context(self.listener, label=self.label,
                                                   file=self.file)

    def is_revoked(self, transport: Any) -> bool:
        """Whether a CRL loaded last lists this connection's client certificate: a CRL of the
        certificate's issuer lists its serial number."""
        if self.revoked is None:
            return False
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return False
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return False
        from cryptography import x509

        certificate = x509.load_der_x509_certificate(der)
        return (certificate.issuer, certificate.serial_number) in self.revoked


def peer_common_name(transport: Any) -> str | None:
    """The subject CN of the client certificate the TLS handshake verified, or None (no TLS,
    no certificate, or none verified, or no CN). With several CNs, the first."""
    certificate = transport.get_extra_info("peercert")
    if not certificate:
        return None
    for rdn in certificate.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and value:
                return str(value)
    return None
