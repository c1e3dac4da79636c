"""A small certificate authority for one gateway and its devices (`edge-broker certs`).

Files in the directory DIR:

    ca.crt, ca.key          the CA (keep ca.key off the gateway once the devices are issued)
    ca.crl                  the revocation list, signed by the CA (written by init-ca, revoke, crl)
    server.crt, server.key  the broker's certificate (serverAuth, SAN from --host/--ip)
    <ID>.crt, <ID>.key      one device (clientAuth, CN = ID)
    <ID>-bundle/            what to copy to the device: ca.crt, client.crt, client.key

Keys are unencrypted PKCS#8 PEM written 0600 (the broker starts unattended), atomically;
certificates and the CRL 0644. EC P-256 by default, RSA 3072 with key_type="rsa".
A CRL has a next-update date (`crl_days`, 365 by default): TLS stacks that check the CRL
refuse every client once it has passed, so `certs crl DIR` re-signs it (put it in a timer).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from edge_broker.auth.files import write_atomic
from edge_broker.errors import EdgeBrokerError

KeyType = Literal["ec", "rsa"]

CA_DAYS: Final = 3650
LEAF_DAYS: Final = 825
CRL_DAYS: Final = 365
RSA_BITS: Final = 3072
_SKEW: Final = dt.timedelta(minutes=5)  # not-before slightly in the past: clocks differ
DEVICE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_RESERVED: Final = frozenset({"ca", "server"})


class CertError(EdgeBrokerError):
    """A certificate command cannot do what was asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path
    serial: int
    bundle: Path | None = None


def validate_device_id(device_id: str) -> str:
    """A device id becomes a file name and a CN: letters, digits, `.`, `_`, `@`, `-`, at most
    64 characters, starting with a letter or digit, and not `ca` or `server`."""
    if not DEVICE_ID.fullmatch(device_id):
        raise CertError(f"invalid device id {device_id!r}: use 1-64 letters, digits, '.', "
                        f"'_', '@' or '-', starting with a letter or digit")
    if device_id.lower() in _RESERVED:
        raise CertError(f"invalid device id {device_id!r}: the name of the CA's or the "
                        f"server's files")
    return device_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key(key_type: KeyType) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise CertError(f"unknown key type {key_type!r} (ec or rsa)")


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)


def _write_cert(path: Path, cert: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _load_ca(directory: Path) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    except FileNotFoundError as exc:
        raise CertError(f"{exc.filename}: not found (run `edge-broker certs init-ca "
                        f"{directory}` first)") from None
    except (ValueError, TypeError) as exc:
        raise CertError(f"{directory}: cannot read the CA: {exc}") from None
    return cert, key


def _period(days: int, valid_from: dt.datetime | None,
            valid_until: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise CertError("--days must be at least 1")
    start = valid_from if valid_from is not None else _now() - _SKEW
    end = valid_until if valid_until is not None else _now() + dt.timedelta(days=days)
    return start, end


def init_ca(directory: str | Path, *, days: int = CA_DAYS, key_type: KeyType = "ec",
            force: bool = False, name: str = "edge-broker CA",
            crl_days: int = CRL_DAYS) -> Issued:
    """Create DIR (0700) with ca.crt, ca.key and an empty ca.crl."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    folder = Path(directory)
    if ((folder / "ca.key").exists() or (folder / "ca.crt").exists()) and not force:
        raise CertError(f"{folder}: a CA exists already (ca.crt/ca.key); --force replaces "
                        f"it, and every certificate it issued stops being accepted")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _period(days, None, None)
    public = key.public_key()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(folder / "ca.key", key)
    _write_cert(folder / "ca.crt", cert)
    _write_crl(folder, cert, key, [], crl_days, number=1)
    return Issued(folder / "ca.crt", folder / "ca.key", cert.serial_number)


def _leaf(directory: Path, common_name: str, *, client: bool, key_type: KeyType, days: int,
          sans: Sequence[Any] = (), valid_from: dt.datetime | None = None,
          valid_until: dt.datetime | None = None) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = _load_ca(directory)
    key = _new_key(key_type)
    start, end = _period(days, valid_from, valid_until)
    end = min(end, ca_cert.not_valid_after_utc)  # a leaf cannot outlive its CA
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False,
                   key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                   data_encipherment=False, key_agreement=False, key_cert_sign=False,
                   crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(
                   x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                   critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)),
                                        critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def issue_server(directory: str | Path, *, hosts: Sequence[str] = (), ips: Sequence[str] = (),
                 days: int = LEAF_DAYS, key_type: KeyType = "ec") -> Issued:
    """server.crt/server.key for the broker, replacing an older pair (nobody else holds it)."""
    from cryptography import x509

    if not hosts and not ips:
        raise CertError("give the names clients connect to: --host NAME and/or --ip ADDRESS")
    sans: list[Any] = []
    for host in hosts:
        if not host or "/" in host or any(ch.isspace() for ch in host):
            raise CertError(f"invalid host name {host!r}")
        sans.append(x509.DNSName(host))
    for text in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            raise CertError(f"invalid IP address {text!r}") from None
    folder = Path(directory)
    cert, key = _leaf(folder, (list(hosts) or list(ips))[0], client=False, key_type=key_type,
                      days=days, sans=sans)
    _write_key(folder / "server.key", key)
    _write_cert(folder / "server.crt", cert)
    return Issued(folder / "server.crt", folder / "server.key", cert.serial_number)


def issue_device(directory: str | Path, device_id: str, *, days: int = LEAF_DAYS,
                 key_type: KeyType = "ec", force: bool = False,
                 valid_from: dt.datetime | None = None,
                 valid_until: dt.datetime | None = None) -> Issued:
    """<ID>.crt/<ID>.key (CN = ID, clientAuth) and the bundle <ID>-bundle/ for the device.
    `valid_from`/`valid_until` replace `days` (tests make expired certificates with them)."""
    validate_device_id(device_id)
    folder = Path(directory)
    cert_path, key_path = folder / f"{device_id}.crt", folder / f"{device_id}.key"
    if cert_path.exists() and not force:
        raise CertError(f"{cert_path}: exists already; --force issues a new one (revoke the "
                        f"old one first if it may have leaked: `certs revoke`)")
    cert, key = _leaf(folder, device_id, client=True, key_type=key_type, days=days,
                      valid_from=valid_from, valid_until=valid_until)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    bundle = folder / f"{device_id}-bundle"
    bundle.mkdir(mode=0o700, exist_ok=True)
    write_atomic(bundle / "ca.crt", (folder / "ca.crt").read_bytes(), mode=0o644)
    _write_cert(bundle / "client.crt", cert)
    _write_key(bundle / "client.key", key)
    return Issued(cert_path, key_path, cert.serial_number, bundle)


def _write_crl(directory: Path, ca_cert: Any, ca_key: Any,
               revoked: list[tuple[int, dt.datetime]], crl_days: int, number: int) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    if crl_days < 1:
        raise CertError("--crl-days must be at least 1")
    now = _now()
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - _SKEW)
               .next_update(now + dt.timedelta(days=crl_days))
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(
                   x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                   critical=False))
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
            .build())
    crl = builder.sign(ca_key, hashes.SHA256())

    write_atomic(directory / "ca.crl", crl.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _read_crl(directory: Path, ca_cert: Any) -> tuple[list[tuple[int, dt.datetime]], int]:
    from cryptography import x509

    path = directory / "ca.crl"
    if not path.exists():
        return [], 0
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM CRL ({exc})") from None
    if not crl.is_signature_valid(ca_cert.public_key()):
        raise CertError(f"{path}: not signed by this CA's ca.crt")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return [(entry.serial_number, entry.revocation_date_utc) for entry in crl], number


def revoke(directory: str | Path, device_id: str, *, crl_days: int = CRL_DAYS) -> bool:
    """Add <ID>.crt's serial to ca.crl (re-signed). False if it was revoked already."""
    from cryptography import x509

    validate_device_id(device_id)
    folder = Path(directory)
    ca_cert, ca_key = _load_ca(folder)
    path = folder / f"{device_id}.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"{path}: not found (no device {device_id!r} in {folder})") from None
    if cert.issuer != ca_cert.subject:
        raise CertError(f"{path}: not issued by this CA")
    revoked, number = _read_crl(folder, ca_cert)
    if any(serial == cert.serial_number for serial, _ in revoked):
        _write_crl(folder, ca_cert, ca_key, revoked, crl_days, number + 1)
        return False
    revoked.append((cert.serial_number, _now()))
    _write_crl(folder, ca_cert, ca_key, revoked, crl_days, number + 1)
    return True


def refresh_crl(directory: str | Path, *, crl_days: int = CRL_DAYS) -> int:
    """Re-sign ca.crl with a new next-update date; returns the number of revoked entries."""
    folder = Path(directory)
    ca_cert, ca_key = _load_ca(folder)
    revoked, number = _read_crl(folder, ca_cert)
    _write_crl(folder, ca_cert, ca_key, revoked, crl_days, number + 1)
    return len(revoked)
