#!/usr/bin/env bash
# The README's two commands, tried as a new user on a fresh Debian 12 machine would: a
# debootstrap minbase root (as bare as a minimal install), a fresh clone of this checkout in
# it, command 1 (install + quickstart mount), a look at the mount, command 2 (the tests).
# Prints each command's exit status and its last lines. Not part of the test run: it downloads
# a few hundred MB of packages and takes 15-30 minutes.
#
#   bash tests/fresh_machine.sh [ROOT_DIR]      (as root; ROOT_DIR default /var/tmp/ossfuse-fresh)
#
# The root gets this machine's CA bundle and DNS settings (so apt and pip reach the same
# registries as the host) and, when it exists, a copy of ../shared beside the clone, as CI has.
# Everything runs in a private mount namespace with a new tmpfs on /run and /tmp: nothing
# it mounts outlives it, and /run is empty as after a reboot.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-/var/tmp/ossfuse-fresh}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 2; }

if ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
rm -rf "$root"
echo "== debootstrap --variant=minbase bookworm $root"
if ! debootstrap --variant=minbase bookworm "$root" "$mirror" > /tmp/fresh-debootstrap.log 2>&1; then
    tail -20 /tmp/fresh-debootstrap.log; echo "debootstrap failed"; exit 1
fi
mkdir -p "$root/root/work"
git clone -q "$repo" "$root/root/work/ossfuse"
[ -d "$repo/../shared" ] && cp -a "$repo/../shared" "$root/root/work/shared"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$root/root/host-ca.crt"
for f in /etc/pip.conf; do [ -f "$f" ] && cp "$f" "$root$f"; done

cat > "$root/root/steps.sh" <<'STEPS'
set -u
export PIP_CERT=/root/host-ca.crt REQUESTS_CA_BUNDLE=/root/host-ca.crt SSL_CERT_FILE=/root/host-ca.crt
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
cd /root/work/ossfuse
t0=$(date +%s)
bash .ci/install > /root/cmd1.log 2>&1 && .venv/bin/ossfuse quickstart >> /root/cmd1.log 2>&1
rc1=$?
echo "== command 1 (bash .ci/install && .venv/bin/ossfuse quickstart): exit $rc1 in $(( $(date +%s) - t0 )) s"
tail -8 /root/cmd1.log
if [ $rc1 = 0 ]; then
    echo "== the mount: $(grep ' /mnt/ossfuse ' /proc/self/mounts | cut -d' ' -f1-3)"
    echo "hello from a fresh machine" > /mnt/ossfuse/hello.txt && echo "read back: $(cat /mnt/ossfuse/hello.txt)"
fi
t0=$(date +%s)
.venv/bin/python -m pytest -q -n 2 > /root/cmd2.log 2>&1
rc2=$?
echo "== command 2 (.venv/bin/python -m pytest -q -n 2): exit $rc2 in $(( $(date +%s) - t0 )) s"
tail -12 /root/cmd2.log
if grep -q ' /mnt/ossfuse ' /proc/self/mounts; then
    .venv/bin/ossfuse umount /mnt/ossfuse; echo "== umount /mnt/ossfuse: exit $?"
fi
echo "== mounts left: $(grep -c fuse /proc/self/mounts)"
[ $rc1 = 0 ] && [ $rc2 = 0 ]
STEPS

unshare -m --propagation private bash -c '
    r=$1
    # this namespace got a copy of every mount, FUSE mounts of running daemons too: release
    # them, or their owners wait for this run to end before they can unmount
    awk '"'"'$3 ~ /^fuse/ {print $2}'"'"' /proc/self/mounts | while read -r m; do umount -l "$m"; done
    # the root a mount point of its own, as / is on a real machine (unshare --propagation needs it)
    mount --bind "$r" "$r" &&
    mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" &&
    mount -t tmpfs tmpfs "$r/run" && mount -t tmpfs tmpfs "$r/tmp" || exit 3
    # a clean environment, as a login on the new machine has (no PIP_* or other variables of the calling shell)
    chroot "$r" /usr/bin/env -i TERM=xterm LANG=C.UTF-8 /bin/bash /root/steps.sh
' _ "$root"
rc=$?
echo "== fresh machine: $([ $rc = 0 ] && echo PASS || echo "FAIL (exit $rc)")"
exit $rc
