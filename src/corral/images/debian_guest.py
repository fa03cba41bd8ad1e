"""Files the Debian image carries for its first boot under corral: cloud-init, networking, sshd and
guest-agent drop-ins. They shape the image, so they are part of its recipe hash (see debian.Recipe)."""

#: cloud-init: NoCloud only (no network probing of cloud metadata services, which costs minutes), the
#: networkd renderer, and the Corral default user for cloud-configs that say `users: [default]`.
CLOUD_CFG = """\
# Corral: look only for a NoCloud seed (then fall back to no datasource); render networks for networkd.
datasource_list: [NoCloud, None]
# No RSA (or DSA) host key: generating one takes ~25 s under TCG; seeds without their own list get these.
ssh_genkeytypes: [ed25519, ecdsa]
system_info:
  default_user:
    name: corral
    gecos: Corral default user
    groups: [sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
    lock_passwd: true
  network:
    renderers: [networkd]
"""

#: DHCP on any NIC cloud-init did not configure (cloud-init's own 10-cloud-init-*.network files sort first).
FALLBACK_NETWORK = """\
[Match]
Name=eth* en*

[Network]
DHCP=yes
"""

#: sshd starts after cloud-init wrote the host keys; if there are none (cloud-init disabled or broken) it makes
#: an ed25519 key so sshd cannot fail. Not `ssh-keygen -A`: its RSA key alone takes ~25 s under TCG.
SSH_DROPIN = """\
[Unit]
After=cloud-init.service

[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || \
  ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
"""

#: Start the guest agent as soon as udev has made its virtio-serial port (~5 s into boot) instead of after
#: basic.target, which waits for cloud-init's network stages (~20 s more under TCG). The host can then see the
#: guest, run commands and shut it down cleanly while the rest of the boot continues.
AGENT_DROPIN = """\
[Unit]
DefaultDependencies=no
After=systemd-remount-fs.service systemd-journald.socket
Conflicts=shutdown.target
Before=shutdown.target
"""

#: One configured link is enough to be "online"; do not hold up boot for 2 minutes on a VM without a NIC.
WAIT_ONLINE_DROPIN = """\
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
"""
