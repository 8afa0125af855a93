#!/bin/sh
# Guest-side smoke test of the kernel VDUSE stack with QEMU's own VDUSE server:
#   scripts/vm-run --outdir build/qsd-anchor -- sh scripts/guest/qsd-anchor.sh
#
# qemu-storage-daemon exports a tmpfs file as a vduse-blk device, `vdpa dev add`
# binds it to virtio_vdpa (-> /dev/vdX), 4 MiB of random data written with
# O_DIRECT must read back identical, a short fio randread reports IOPS, and the
# device is removed again. Prints "QSD ANCHOR OK" and exits 0 on success.
# Set ANCHOR_FIO_SECONDS=0 to skip fio.
set -eu

NAME=${ANCHOR_NAME:-vduse0}
WORK=${TMPDIR:-/tmp}/qsd-anchor
FIO_SECONDS=${ANCHOR_FIO_SECONDS:-5}
QSD_PID=
added=0

say() { echo "anchor: $*"; }
cleanup() {
    rc=$?
    set +e
    if [ "$added" -eq 1 ]; then vdpa dev del "$NAME" 2>/dev/null; fi
    if [ -n "$QSD_PID" ] && kill -0 "$QSD_PID" 2>/dev/null; then
        kill "$QSD_PID"; wait "$QSD_PID" 2>/dev/null
    fi
    [ "$rc" -eq 0 ] || { say "FAILED (exit $rc)"; [ -f "$WORK/qsd.log" ] && sed 's/^/  qsd: /' "$WORK/qsd.log"; }
    exit "$rc"
}
trap cleanup EXIT

[ -e /dev/vduse/control ] || { say "/dev/vduse/control missing (modprobe vduse?)"; exit 1; }
mkdir -p "$WORK"
truncate -s 256M "$WORK/disk.img"

say "starting qemu-storage-daemon ($(qemu-storage-daemon --version | head -n1))"
qemu-storage-daemon \
    --blockdev "driver=file,filename=$WORK/disk.img,node-name=disk0" \
    --export "type=vduse-blk,id=e0,node-name=disk0,writable=on,name=$NAME,num-queues=1,queue-size=128" \
    >"$WORK/qsd.log" 2>&1 &
QSD_PID=$!

# The daemon creates /dev/vduse/NAME first and sets up its queues after that;
# `vdpa dev add` before it is done fails with EINVAL, so retry for a while.
i=0
until [ -e "/dev/vduse/$NAME" ]; do
    i=$((i + 1)); [ "$i" -le 300 ] || { say "/dev/vduse/$NAME never appeared"; exit 1; }
    kill -0 "$QSD_PID" 2>/dev/null || { say "qemu-storage-daemon exited early"; exit 1; }
    sleep 0.1
done
i=0
until vdpa dev add name "$NAME" mgmtdev vduse 2>"$WORK/vdpa.err"; do
    i=$((i + 1)); [ "$i" -le 60 ] || { say "vdpa dev add failed: $(cat "$WORK/vdpa.err")"; exit 1; }
    sleep 0.5
done
added=1
say "vdpa dev add after $i retries: $(vdpa dev show "$NAME")"

# Find the block device that belongs to THIS vdpa device (never trust a bare
# /dev/vda: if the add failed, dd would write a plain file in devtmpfs).
dev=
i=0
while [ -z "$dev" ]; do
    for b in /sys/bus/vdpa/devices/"$NAME"/virtio*/block/*; do
        [ -e "$b" ] && dev=${b##*/}
    done
    [ -n "$dev" ] && break
    i=$((i + 1)); [ "$i" -le 100 ] || { say "no block device under /sys/bus/vdpa/devices/$NAME"; exit 1; }
    sleep 0.1
done
[ -b "/dev/$dev" ] || { say "/dev/$dev is not a block device"; exit 1; }
say "block device /dev/$dev -> $(readlink -f "/sys/block/$dev")"
say "size $(cat "/sys/block/$dev/size") sectors"

dd if=/dev/urandom of="$WORK/pattern" bs=1M count=4 status=none
dd if="$WORK/pattern" of="/dev/$dev" bs=1M count=4 oflag=direct status=none
dd if="/dev/$dev" of="$WORK/readback" bs=1M count=4 iflag=direct status=none
cmp "$WORK/pattern" "$WORK/readback"
say "4 MiB O_DIRECT write/read-back identical"

if [ "$FIO_SECONDS" -gt 0 ]; then
    fio --name=anchor --filename="/dev/$dev" --rw=randread --bs=4k --iodepth=16 \
        --ioengine=libaio --direct=1 --runtime="$FIO_SECONDS" --time_based \
        --output-format=terse --terse-version=3 >"$WORK/fio.out"
    # terse v3: field 8 = read IOPS
    say "fio 4k randread QD16 libaio direct ${FIO_SECONDS}s: $(cut -d';' -f8 "$WORK/fio.out") IOPS"
fi

vdpa dev del "$NAME"
added=0
i=0
while [ -e "/sys/block/$dev" ]; do
    i=$((i + 1)); [ "$i" -le 50 ] || { say "/sys/block/$dev still there after vdpa dev del"; exit 1; }
    sleep 0.1
done
kill "$QSD_PID"
wait "$QSD_PID" || true
QSD_PID=
say "vdpa dev del done, daemon stopped"
echo "QSD ANCHOR OK"
