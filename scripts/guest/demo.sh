#!/bin/sh
# The pyvduse demo, run INSIDE the VM guest by scripts/demo: a file-backed
# virtio-blk device served by pyvduse through the real VDUSE driver, with an
# ext4 file system made, used, remounted and checked on it.
set -eu
PYVDUSE="$1"
IMG="$TMPDIR/demo-disk.img"
MNT="$TMPDIR/demo-mnt"
step() { printf '\n==> %s\n' "$*"; }

step "kernel $(uname -r); VDUSE control device: $(ls /dev/vduse/control)"

step "a 256 MiB sparse backing file: $IMG"
truncate -s 256M "$IMG"

step "pyvduse serve --name demo0 --num-queues 2 --serial pyvduse-demo file path=$IMG"
"$PYVDUSE" serve --name demo0 --num-queues 2 --serial pyvduse-demo \
    --pidfile "$TMPDIR/demo0.pid" file path="$IMG" 2>"$TMPDIR/demo0.log" &
DAEMON=$!
i=0
while [ ! -f "$TMPDIR/demo0.pid" ]; do
    i=$((i + 1))
    if [ "$i" -gt 600 ] || ! kill -0 "$DAEMON" 2>/dev/null; then
        echo "the daemon did not come up:"; cat "$TMPDIR/demo0.log"; exit 1
    fi
    sleep 0.3
done
sed 's/^/    daemon: /' "$TMPDIR/demo0.log"
DISK=$(basename /sys/bus/vdpa/devices/demo0/virtio*/block/*)
DEV=/dev/$DISK
echo "    the kernel sees $DEV: $(( $(cat /sys/block/$DISK/size) / 2048 )) MiB," \
     "serial '$(cat /sys/block/$DISK/serial)', $(ls /sys/block/$DISK/mq | wc -l) queues," \
     "vdpa driver $(basename "$(readlink /sys/bus/vdpa/devices/demo0/driver)")"

step "mkfs.ext4 $DEV"
mkfs.ext4 -q -L pyvduse-demo "$DEV"
mkdir -p "$MNT"
mount "$DEV" "$MNT"
df -h "$MNT" | sed 's/^/    /'

step "write files on it"
mkdir "$MNT/photos"
head -c 20M /dev/urandom >"$MNT/photos/big.bin"
seq 1 100000 >"$MNT/numbers.txt"
echo "hello from a Python block device" >"$MNT/hello.txt"
(cd "$MNT" && sha256sum photos/big.bin numbers.txt hello.txt) >"$TMPDIR/sums"
sed 's/^/    /' "$TMPDIR/sums"
sync

step "unmount, mount again, and verify every file"
umount "$MNT"
mount "$DEV" "$MNT"
(cd "$MNT" && sha256sum -c "$TMPDIR/sums") | sed 's/^/    /'
cat "$MNT/hello.txt" | sed 's/^/    hello.txt says: /'
umount "$MNT"

step "file system check"
e2fsck -fn "$DEV" 2>&1 | tail -n 1 | sed 's/^/    /'

step "stop the daemon (SIGTERM): detach, drain, destroy"
kill -TERM "$DAEMON"
wait "$DAEMON" && echo "    exit status 0"
sed 's/^/    daemon: /' "$TMPDIR/demo0.log" | tail -n 4
[ ! -e /dev/vduse/demo0 ] && [ ! -e /sys/bus/vdpa/devices/demo0 ] && echo "    nothing left behind"

step "the data lives in the backing file: its ext4 label is '$(e2label "$IMG")'"
echo "    allocated $(du -h "$IMG" | cut -f1) of $(du -h --apparent-size "$IMG" | cut -f1)"
echo
echo "demo finished: pyvduse served a real file system through the kernel's VDUSE driver."
