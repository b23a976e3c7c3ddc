#!/bin/sh
# Per-container start: a fresh host key, the controller's public key, then sshd in the foreground.
set -e
if [ ! -f /etc/ssh/ssh_host_ed25519_key ]; then
  ssh-keygen -q -t ed25519 -N '' -C "$(hostname)" -f /etc/ssh/ssh_host_ed25519_key
fi
# The key is mounted read-only (owned by whoever runs the controller): copy it so that
# sshd's StrictModes sees the owner and modes it expects.
if [ ! -s /run/sshjobs/authorized_keys ]; then
  echo "no /run/sshjobs/authorized_keys mounted: nobody could log in" >&2
  exit 1
fi
install -d -m 700 -o sshjobs -g sshjobs /home/sshjobs/.ssh
install -m 600 -o sshjobs -g sshjobs /run/sshjobs/authorized_keys /home/sshjobs/.ssh/authorized_keys
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
