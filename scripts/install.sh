#!/bin/sh
# Install envctl system-wide from this checkout (run by `make install`, as root):
#   /opt/envctl                   a venv from Debian's python3 with envctl[daemon] (+ systemd-python
#                                 when it builds), so every uid can run the CLI
#   /usr/local/bin/envctl         the CLI on users' PATH
#   /etc/systemd/system/          envctld.service, envctld.socket (replaced on every install;
#                                 site changes belong in drop-ins: `systemctl edit envctld`)
#   /etc/sysusers.d/envctl.conf   the envctl-build user, created now and at every boot
#   /etc/tmpfiles.d/envctl.conf   /etc/envctl
#   /etc/envctl/envctld.yaml      the example config, only if there is none (never overwritten)
# then `systemctl daemon-reload`. It does not enable or start anything: the config and the
# roots' ReadWritePaths= drop-in must be right first (the script prints the next steps).
#
# Needs a C compiler and the Python headers (gcc, python3-dev): the healer has a C extension,
# optional for client-only installs but required here (ENVCTL_REQUIRE_EXTENSION=1).
# Environment: PYTHON (default /usr/bin/python3), PREFIX (default /opt/envctl), ENVCTL_PIP_ARGS
# (extra pip arguments, e.g. "--no-index --find-links /srv/wheelhouse" on an offline host).
set -eu

PYTHON=${PYTHON:-/usr/bin/python3}
PREFIX=${PREFIX:-/opt/envctl}
ENVCTL_PIP_ARGS=${ENVCTL_PIP_ARGS:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)
UNITDIR=/etc/systemd/system

say() { printf 'install: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "install: must run as root (it writes /opt, /etc and creates a system user)" >&2
    exit 77
fi
# A venv from a pyenv/conda python under /root would be unusable by other uids.
case "$(readlink -f "$PYTHON")" in
    /usr/bin/*|/usr/local/bin/*) ;;
    *) echo "install: PYTHON=$PYTHON is not a system interpreter; other users could not run" \
            "the CLI. Use /usr/bin/python3." >&2; exit 64 ;;
esac

# Build from a copy: pip builds in the source tree, which may be read-only or someone's checkout.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -C "$SRC" --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.so' -cf - \
    pyproject.toml setup.py README.md daemon \
    | tar -C "$work" -xf -

say "venv $PREFIX (from $PYTHON)"
[ -x "$PREFIX/bin/python" ] || "$PYTHON" -m venv "$PREFIX"
# shellcheck disable=SC2086  # ENVCTL_PIP_ARGS is a list of words on purpose
ENVCTL_REQUIRE_EXTENSION=1 "$PREFIX/bin/pip" install -q --disable-pip-version-check \
    $ENVCTL_PIP_ARGS "$work[daemon]"
# Optional: journald fields and libsystemd's sd_notify. Needs libsystemd-dev and a compiler; the
# daemon works without it (its own sd_notify, key=value logs that journald still captures).
# shellcheck disable=SC2086
"$PREFIX/bin/pip" install -q --disable-pip-version-check $ENVCTL_PIP_ARGS "$work[systemd]" \
    >/dev/null 2>&1 || say "systemd-python not installed (optional; see docs/systemd.md)"
ln -sf "$PREFIX/bin/envctl" /usr/local/bin/envctl
install -D -m 0644 "$SRC/docs/systemd.md" "$PREFIX/share/doc/envctl/systemd.md"

say "units in $UNITDIR"
install -m 0644 "$SRC/systemd/envctld.service" "$SRC/systemd/envctld.socket" "$UNITDIR/"
install -D -m 0644 "$SRC/systemd/envctl.sysusers.conf" /etc/sysusers.d/envctl.conf
install -D -m 0644 "$SRC/systemd/envctl.tmpfiles.conf" /etc/tmpfiles.d/envctl.conf
systemd-sysusers /etc/sysusers.d/envctl.conf
systemd-tmpfiles --create /etc/tmpfiles.d/envctl.conf

if [ -e /etc/envctl/envctld.yaml ]; then
    say "keeping existing /etc/envctl/envctld.yaml"
else
    install -D -m 0644 "$SRC/config/envctld.yaml" /etc/envctl/envctld.yaml
    say "installed example /etc/envctl/envctld.yaml"
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
cat <<NEXT
install: done. Next:
  1. edit /etc/envctl/envctld.yaml (roots, groups, requests.allow_*)
  2. list every root in ReadWritePaths=:  systemctl edit envctld
       [Service]
       ReadWritePaths=/your/root
  3. systemctl enable --now envctld.socket envctld.service
  4. envctl status
NEXT
