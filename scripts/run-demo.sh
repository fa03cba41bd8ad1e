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

"$corral" serve --detach
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
MSG
