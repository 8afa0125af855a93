#!/bin/sh
# Runs INSIDE the guest (started by scripts/vm-run through virtme-ng); not for
# use on the host. $1 is the job file vm-run wrote into the outdir: it sets
# VM_RUN_* variables, exports the caller's --env settings and does `set --`
# with the command to run.
#
# Prepares the guest (tmpfs on /tmp, TMPDIR, modules), runs the command with
# cwd = repo root (read-only here), tees its stdout+stderr into
# $VM_RUN_OUTDIR/guest.log (and so onto the console), and writes its exit code
# to $VM_RUN_OUTDIR/exit-code. A failed preparation step writes exit code 126
# and a line starting with "vm-init:" to guest.log.
set -u

job=${1:?usage: vm-init.sh JOBFILE}
# shellcheck disable=SC1090
. "$job"
out=$VM_RUN_OUTDIR
log=$out/guest.log

fail() {
    echo "vm-init: $*" | tee -a "$log"
    echo 126 >"$out/exit-code"
    sync
    exit 126
}

# The shared root (and so /tmp) is read-only: give scratch space a tmpfs on
# /tmp. If the repo or the outdir live under the host's /tmp (a CI clone, a
# pytest tmp_path), keep them reachable at the same path: hold the host /tmp
# (with its sub-mounts, such as the writable outdir) under /run first, then
# bind them back on top of the tmpfs.
hold=/run/vm-run/host-tmp
need_repo=0
need_out=0
case "$VM_RUN_REPO/" in /tmp/?*) need_repo=1 ;; esac
case "$out/" in "$VM_RUN_REPO"/*) ;; /tmp/?*) need_out=1 ;; esac  # under the repo: comes with it
keep_back() {
    mkdir -p "$1" && mount --rbind "$hold/${1#/tmp/}" "$1" || fail "cannot bind $1 back over the tmpfs"
}
if [ $need_repo = 1 ] || [ $need_out = 1 ]; then
    mkdir -p "$hold" && mount --rbind /tmp "$hold" || fail "cannot hold host /tmp under $hold"
fi
mount -t tmpfs -o "mode=1777,size=$VM_RUN_TMPFS_SIZE" tmpfs /tmp || fail "cannot mount tmpfs on /tmp"
[ $need_repo = 0 ] || keep_back "$VM_RUN_REPO"
[ $need_out = 0 ] || keep_back "$out"
export TMPDIR=/tmp
export PYTHONDONTWRITEBYTECODE=1

: >"$log"
mkdir -p "$out/.vm-run"
cut -d' ' -f1 /proc/uptime >"$out/.vm-run/guest-uptime-at-start"

for m in $VM_RUN_MODULES; do
    modprobe "$m" || fail "modprobe $m failed (kernel $(uname -r))"
done

cd "$VM_RUN_REPO" || fail "cannot cd to $VM_RUN_REPO"

# The subshell's exit code is recorded before tee closes; the file is renamed
# into place only after tee has flushed guest.log.
{
    "$@"
    echo $? >"$out/.vm-run/exit-code.tmp"
} </dev/null 2>&1 | tee -a "$log"
if [ -s "$out/.vm-run/exit-code.tmp" ]; then
    mv "$out/.vm-run/exit-code.tmp" "$out/exit-code"
else
    fail "command ended without recording its exit code"
fi
sync
exit "$(cat "$out/exit-code")"
