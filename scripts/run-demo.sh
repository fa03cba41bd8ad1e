#!/usr/bin/env bash
# `make run`: start corral and a first VM "demo" on the tiny image. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
corral="$PWD/.venv/bin/corral"

# Put corral on PATH for the commands printed below.
if [ "$(id -u)" -eq 0 ] && [ -d /usr/local/bin ]; then
  ln -sf "$corral" /usr/local/bin/corral
  corral_cmd=corral
else
  corral_cmd="$corral"
fi

# HTTPS on the loopback for the web console (and remote clients): CORRAL_LISTEN=0.0.0.0:8443 serves the network.
"$corral" serve --detach --listen "${CORRAL_LISTEN:-127.0.0.1:8443}"
"$corral" image build tiny
if ! "$corral" vm show demo >/dev/null 2>&1; then
  "$corral" vm run demo --image tiny
else
  state=$("$corral" vm show demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  case "$state" in
    running) ;;
    paused) "$corral" vm resume demo ;;
    *) "$corral" vm start demo --wait ;;
  esac
fi
echo
"$corral" vm list
echo
"$corral" vm exec demo -- uname -sr
cat <<MSG

corral is running (home: ${CORRAL_HOME:-/var/lib/corral}) with the VM "demo". Try:
  $corral_cmd vm console demo          # the serial console (Ctrl-] detaches)
  $corral_cmd vm exec demo -- ip addr  # a command in the guest, through its guest agent
  $corral_cmd vm show demo             # state, disks, addresses
  $corral_cmd vm run web --image tiny  # another VM
  $corral_cmd --help
  $corral_cmd ui                       # a new one-time login link to the web console

The web console: https://${CORRAL_LISTEN:-127.0.0.1:8443}/ui/ (log in with a token from \`corral token create\`,
or open this one-time link, good for a minute, as the local admin; the certificate is self-signed):
MSG
"$corral" ui || echo "(no web console: the daemon was started without --listen; restart it with \`corral shutdown\`)"
