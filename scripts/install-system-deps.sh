#!/usr/bin/env bash
# Installs the Debian packages corral needs, only those missing, so it is quick when run again.
set -euo pipefail

packages=(
  qemu-system-x86   # the VMM
  qemu-utils        # qemu-img
  e2fsprogs         # mkfs.ext4 -d builds guest root filesystems without loop mounts
  busybox-static    # the tiny image's userland
  cpio              # initramfs archives
  python3-venv      # the project's virtualenv
  libglib2.0-0 libudev1 libnuma1 liburing2   # libraries the guest agent binary is shipped with
  iproute2 procps
  debootstrap       # the Debian image builder
  openssh-client    # corral vm ssh, and the SSH tests
  dnsmasq-base      # DHCP and DNS for corral networks (one instance per network)
  nftables          # NAT, port forwards, isolation and anti-spoofing rules of corral networks
  ovmf              # UEFI firmware for VMs booted with --firmware uefi
  # The disk-boot tests build a bootable disk image without mounting it: partition table, FAT, syslinux for BIOS,
  # a standalone GRUB for UEFI.
  fdisk dosfstools mtools syslinux syslinux-common grub-efi-amd64-bin grub-common
  postgresql        # a pool's shared store; the tests start throw-away servers from its initdb/pg_ctl
  acl               # per-VM read grants (setfacl) on shared read-only bases: a tenant's QEMU reads only its own images
  nodejs npm        # the web console's browser packages come from npm (frontend/package.json, `make setup`)
  chromium chromium-driver   # the web console's browser tests (Playwright drives Debian's chromium)
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# A pyenv or other non-Debian Python may already have venv; then python3-venv is not needed.
if python3 -c 'import ensurepip, venv' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}")
fi
# A node from another source (e.g. NodeSource's nodejs, which ships npm itself) serves as well as Debian's.
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}")
  missing=("${missing[@]/npm}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))

# apt-get download (used by the image builder) needs package lists even when nothing is missing.
lists_empty=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -1)

if [ ${#missing[@]} -eq 0 ] && [ -n "$lists_empty" ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing packages: ${missing[*]:-apt lists} (hint: run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]:-(package lists only)}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
