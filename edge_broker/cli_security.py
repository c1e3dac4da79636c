"""`edge-broker passwd` and `edge-broker certs`: the security tools of the command line.

    edge-broker passwd [-c | -D] [--password-stdin] [--scrypt] FILE USER
    edge-broker certs init-ca DIR [--days N] [--key-type ec|rsa] [--force]
    edge-broker certs server DIR --host NAME [--host ...] --ip ADDR [--ip ...] [--days N]
    edge-broker certs device DIR ID [--days N] [--key-type ec|rsa] [--force]
    edge-broker certs revoke DIR ID
    edge-broker certs crl DIR

`passwd` behaves like mosquitto_passwd: silent on success (exit 0); "Error: ..." on stderr
and exit 1 when it cannot do it (file missing without -c, passwords differ, bad username);
"Warning: User X not found in password file." and exit 1 for -D of an absent user.
`certs` prints what it wrote; exit 1 with the reason when it refuses.
Usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from edge_broker.errors import ConfigError

PROG: Final = "edge-broker"
EXIT_FAILED: Final = 1


def add_subcommands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `passwd` and `certs` on the main parser's subcommands."""
    passwd = commands.add_parser(
        "passwd", help="add, update or delete a user of a password file (mosquitto format)",
        description="Add or update USER in FILE (asks for the password twice), or delete it "
                    "with -D. New hashes are mosquitto 2's $7$ (PBKDF2-SHA512): mosquitto "
                    "reads the file too, unless --scrypt is used.")
    passwd.add_argument("file", metavar="FILE")
    passwd.add_argument("username", metavar="USER")
    mode = passwd.add_mutually_exclusive_group()
    mode.add_argument("-c", dest="create", action="store_true",
                      help="create a new file (replaces an existing one)")
    mode.add_argument("-D", dest="delete", action="store_true", help="delete USER")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    passwd.add_argument("--scrypt", action="store_true",
                        help="hash with scrypt ($scrypt$: edge-broker only, mosquitto cannot "
                             "read these lines)")

    certs = commands.add_parser(
        "certs", help="a small CA: server and device certificates, revocation",
        description="Files in DIR: ca.crt, ca.key, ca.crl, server.crt, server.key, <ID>.crt, "
                    "<ID>.key and <ID>-bundle/ (ca.crt, client.crt, client.key) to copy to "
                    "the device. Keys are written 0600.")
    actions = certs.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser("init-ca", help="create the CA (ca.crt, ca.key, empty ca.crl)")
    init.add_argument("dir", metavar="DIR")
    _add_key_flags(init, days=3650)
    init.add_argument("--force", action="store_true",
                      help="replace an existing CA (everything it issued stops working)")
    server = actions.add_parser("server", help="the broker's certificate (server.crt/.key)")
    server.add_argument("dir", metavar="DIR")
    # dest not "host": that name is the run flag's, which main() refuses for other commands
    server.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME",
                        help="a DNS name clients connect to (repeatable)")
    server.add_argument("--ip", dest="ips", action="append", default=[], metavar="ADDR",
                        help="an IP address clients connect to (repeatable)")
    _add_key_flags(server, days=825)
    device = actions.add_parser("device", help="a device certificate, CN = ID, and its bundle")
    device.add_argument("dir", metavar="DIR")
    device.add_argument("device_id", metavar="ID")
    _add_key_flags(device, days=825)
    device.add_argument("--force", action="store_true", help="replace an existing <ID>.crt")
    revoke = actions.add_parser("revoke", help="add ID's certificate to ca.crl")
    revoke.add_argument("dir", metavar="DIR")
    revoke.add_argument("device_id", metavar="ID")
    revoke.add_argument("--crl-days", type=int, default=365, metavar="N",
                        help="the CRL's validity (default 365); re-sign with `certs crl`")
    crl = actions.add_parser("crl", help="re-sign ca.crl with a fresh next-update date")
    crl.add_argument("dir", metavar="DIR")
    crl.add_argument("--crl-days", type=int, default=365, metavar="N")


def _add_key_flags(parser: argparse.ArgumentParser, *, days: int) -> None:
    parser.add_argument("--days", type=int, default=days, metavar="N",
                        help=f"validity in days (default {days})")
    parser.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                        help="EC P-256 (default) or RSA 3072")


def run_command(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace], int] = (
        _cmd_passwd if args.command == "passwd" else _cmd_certs)
    return handler(args)


# --------------------------------------------------------------------------- passwd


def _error(message: str) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return EXIT_FAILED


def _read_password(from_stdin: bool) -> bytes | None:
    if from_stdin:
        line = sys.stdin.buffer.readline()
        return line.removesuffix(b"\n").removesuffix(b"\r")
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Reenter password: ")
    if first != second:
        return None
    return first.encode("utf-8", "surrogateescape")


def _cmd_passwd(args: argparse.Namespace) -> int:
    from edge_broker.auth.passwd import PasswordFile, check_username

    path = Path(args.file)
    try:
        check_username(args.username)
    except ValueError as exc:
        return _error(str(exc))
    if args.create:
        users = PasswordFile()
    else:
        if not path.exists():
            return _error(f"Unable to open password file {path}. No such file or directory.")
        try:
            users = PasswordFile.load(path)
        except ConfigError as exc:
            return _error(str(exc))
    if args.delete:
        if not users.delete(args.username):
            print(f"Warning: User {args.username} not found in password file.",
                  file=sys.stderr)
            return EXIT_FAILED
    else:
        try:
            password = _read_password(args.password_stdin)
        except (EOFError, KeyboardInterrupt):
            return _error("No password given.")
        if password is None:
            return _error("Passwords do not match.")
        if not password:
            return _error("Empty password.")
        users.set(args.username, password, scheme="scrypt" if args.scrypt else "7")
    try:
        users.save(path)
    except OSError as exc:
        return _error(f"Unable to write password file {path}. {exc.strerror}.")
    return 0


# --------------------------------------------------------------------------- certs


def _cmd_certs(args: argparse.Namespace) -> int:
    from edge_broker import certs

    try:
        if args.action == "init-ca":
            issued = certs.init_ca(args.dir, days=args.days, key_type=args.key_type,
                                   force=args.force)
            print(f"wrote {issued.cert}, {issued.key} (keep it safe: it signs every "
                  f"certificate) and {Path(args.dir) / 'ca.crl'}")
        elif args.action == "server":
            issued = certs.issue_server(args.dir, hosts=args.hosts, ips=args.ips, days=args.days,
                                        key_type=args.key_type)
            print(f"wrote {issued.cert} and {issued.key}")
        elif args.action == "device":
            issued = certs.issue_device(args.dir, args.device_id, days=args.days,
                                        key_type=args.key_type, force=args.force)
            print(f"wrote {issued.cert} and {issued.key}; copy {issued.bundle}/ (ca.crt, "
                  f"client.crt, client.key) to the device")
        elif args.action == "revoke":
            if certs.revoke(args.dir, args.device_id, crl_days=args.crl_days):
                print(f"revoked {args.device_id}; {Path(args.dir) / 'ca.crl'} updated "
                      f"(the broker re-reads it on reload)")
            else:
                print(f"{args.device_id} was revoked already; ca.crl re-signed")
        else:
            count = certs.refresh_crl(args.dir, crl_days=args.crl_days)
            print(f"re-signed {Path(args.dir) / 'ca.crl'} ({count} revoked)")
    except certs.CertError as exc:
        print(f"{PROG} certs: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"{PROG} certs: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0
