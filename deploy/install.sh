#!/usr/bin/env bash
# Install, upgrade or remove edge-broker from this checkout on Debian / Raspberry Pi OS
# (Bookworm or later: Python 3.11+). Run as root from anywhere:
#
#   sudo deploy/install.sh                 install or upgrade, enable and (re)start the service
#   sudo deploy/install.sh --no-start      install or upgrade and enable, but do not (re)start
#   sudo deploy/install.sh --uninstall     stop and remove the service and the program; keep
#                                          the configuration and the data
#   sudo deploy/install.sh --uninstall --purge   also remove configuration, data and the user
#   deploy/install.sh --root DIR [...]     everything below DIR instead of /, without creating
#                                          the user or touching systemd (images, tests)
#
# Safe to run again: it creates only what is missing, never overwrites an existing
# /etc/edge-broker/edge-broker.toml, and reinstalls the package from the checkout.
set -euo pipefail

readonly SERVICE_USER=edge-broker
readonly PYTHON="${PYTHON:-python3}"

SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly SRC_DIR

log() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

start=yes
action=install
purge=no
root=""
while (($#)); do
    case "$1" in
        --no-start) start=no ;;
        --uninstall) action=uninstall ;;
        --purge) purge=yes ;;
        --root)
            (($# >= 2)) || die "--root needs a directory"
            root="$(realpath -m -- "$2")"; shift
            [[ $root != / ]] || root="" ;;
        -h|--help) sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
[[ $purge == no || $action == uninstall ]] || die "--purge goes with --uninstall"

readonly PREFIX="$root/opt/edge-broker"
readonly VENV="$PREFIX/.venv"
readonly ETC_DIR="$root/etc/edge-broker"
readonly CONFIG="$ETC_DIR/edge-broker.toml"
readonly STATE_DIR="$root/var/lib/edge-broker"
readonly UNIT="$root/etc/systemd/system/edge-broker.service"

# With --root nothing belongs to the service user (it may not exist on the build host).
if [[ -n $root ]]; then
    owner=(); group_of=()
    systemd=no
else
    [[ $EUID -eq 0 ]] || die "run as root (sudo $0), or give --root DIR"
    owner=(-o root -g root); group_of=(-o root -g "$SERVICE_USER")
    if [[ -d /run/systemd/system ]]; then systemd=yes; else systemd=no; fi
fi

# --- uninstall --------------------------------------------------------------------------
if [[ $action == uninstall ]]; then
    if [[ $systemd == yes ]] && systemctl list-unit-files edge-broker.service >/dev/null 2>&1; then
        systemctl disable --now --quiet edge-broker.service 2>/dev/null || true
    fi
    rm -f "$UNIT"
    [[ $systemd == no ]] || systemctl daemon-reload
    rm -rf "$PREFIX"
    log "removed the service and $PREFIX"
    if [[ $purge == yes ]]; then
        rm -rf "$ETC_DIR" "$STATE_DIR"
        log "purged $ETC_DIR and $STATE_DIR"
        if [[ -z $root ]] && getent passwd "$SERVICE_USER" >/dev/null; then
            userdel "$SERVICE_USER" && log "removed the user $SERVICE_USER"
        fi
    else
        log "kept the configuration ($ETC_DIR) and the data ($STATE_DIR); --purge removes them"
    fi
    exit 0
fi

[[ -f "$SRC_DIR/pyproject.toml" && -d "$SRC_DIR/edge_broker" ]] \
    || die "$SRC_DIR does not look like an edge-broker checkout"

# Files we create must be readable by the service user whatever root's umask is.
umask 022

# --- Python 3.11+ with venv -------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install it with: apt-get install python3"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "edge-broker needs Python 3.11 or later (Debian/Raspberry Pi OS 12 Bookworm or later)"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    [[ -z $root ]] || die "$PYTHON has no venv module: apt-get install python3-venv"
    log "installing python3-venv"
    apt-get install -y python3-venv
fi

# --- service user -----------------------------------------------------------------------
if [[ -z $root ]] && ! getent passwd "$SERVICE_USER" >/dev/null; then
    log "creating system user $SERVICE_USER"
    if getent group "$SERVICE_USER" >/dev/null; then
        group_option=(--gid "$SERVICE_USER")
    else
        group_option=(--user-group)
    fi
    useradd --system "${group_option[@]}" --home-dir /var/lib/edge-broker --no-create-home \
        --shell /usr/sbin/nologin --comment "edge-broker MQTT broker" "$SERVICE_USER"
fi

# --- virtual environment and package ----------------------------------------------------
install -d -m 0755 "${owner[@]}" "$PREFIX"
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
    log "creating virtual environment $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Build from a copy so that root-owned build/ and *.egg-info do not land in the checkout.
build_dir="$(mktemp -d)"
trap 'rm -rf "$build_dir"' EXIT
tar -C "$SRC_DIR" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=build \
    --exclude=__pycache__ --exclude=.mypy_cache --exclude=.pytest_cache --exclude=.ruff_cache \
    --exclude=edge-broker-data -cf - . | tar -C "$build_dir" -xf -
log "installing edge-broker into $VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade "$build_dir"
log "installed: $("$VENV/bin/edge-broker" --version)"

# --- configuration ----------------------------------------------------------------------
install -d -m 0750 "${group_of[@]}" "$ETC_DIR"
if [[ -e "$CONFIG" ]]; then
    log "keeping the existing $CONFIG"
else
    log "installing the example configuration as $CONFIG"
    install -m 0640 "${group_of[@]}" "$SRC_DIR/deploy/edge-broker.toml" "$CONFIG"
fi
# Check it as the service user (who must be able to read it) before touching the service.
if [[ -z $root ]] && command -v runuser >/dev/null; then
    runuser -u "$SERVICE_USER" -- "$VENV/bin/edge-broker" check-config "$CONFIG" >/dev/null \
        || die "$CONFIG is not valid (see above); fix it and run this script again"
else
    "$VENV/bin/edge-broker" check-config "$CONFIG" >/dev/null \
        || die "$CONFIG is not valid (see above); fix it and run this script again"
fi

# --- systemd unit -----------------------------------------------------------------------
install -d -m 0755 "${owner[@]}" "$(dirname "$UNIT")"
install -m 0644 "${owner[@]}" "$SRC_DIR/deploy/edge-broker.service" "$UNIT"
if [[ $systemd == no ]]; then
    log "installed $UNIT but did not enable or start it (no systemd here, or --root)"
    exit 0
fi
systemctl daemon-reload
systemctl enable --quiet edge-broker.service
if [[ $start == no ]]; then
    log "enabled; start it with: systemctl start edge-broker"
elif systemctl is-active --quiet edge-broker.service; then
    log "restarting edge-broker to run the new version"
    systemctl restart edge-broker.service
else
    log "starting edge-broker"
    systemctl start edge-broker.service
fi
log "done. Status: systemctl status edge-broker; logs: journalctl -u edge-broker -f"
