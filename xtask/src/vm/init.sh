#!/bin/sh
# PID 1 of a `cargo xtask vm-test` guest. It mounts what the kernel tests
# expect of a host, runs each test of /vmtest/plan in a process of its own
# and reports on the second serial port (ttyS1), which xtask reads; the
# kernel's console (ttyS0) goes to console.log on the host. Then it powers
# the VM off.
#
# Protocol, one line each on ttyS1 (`| ` lines carry a test's output):
#   VMTEST READY <uname -r>        VMTEST DOCTOR <exit code>
#   VMTEST START <n>               VMTEST SKIP <reason>
#   VMTEST NOTRUN                  VMTEST END <n> <exit code>
#   VMTEST DONE

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
# / is the initramfs itself, in RAM and writable: /run and /tmp need no
# tmpfs (and a tmpfs on /tmp would hide binaries built under it).
mkdir -p /run/netns
# The kernel runs this for the modules it asks for (veth, nf_tables, ...).
command -v modprobe >/proc/sys/kernel/modprobe
ip link set lo up

exec 3>/dev/ttyS1
say() { echo "VMTEST $*" >&3; }
# Copies a file to ttyS1 as `| ` lines.
show() { while IFS= read -r line || [ -n "$line" ]; do echo "| $line" >&3; done <"$1"; }

. /vmtest/env

# The tests run in the background so that PID 1 stays in `wait` and reaps
# the processes they orphan.
run_plan() {
	say READY "$(uname -r)"
	"$MESH_REDIRECT_BIN" doctor >/tmp/doctor.out 2>&1 3>&-
	say DOCTOR $?
	show /tmp/doctor.out
	while IFS='	' read -r n bin name; do
		say START "$n"
		timeout -k 10 "$VMTEST_TIMEOUT" "$bin" --exact "$name" --test-threads=1 --nocapture \
			</dev/null >/tmp/test.out 2>&1 3>&-
		rc=$?
		if ! grep -q '^running 1 test$' /tmp/test.out; then
			say NOTRUN
		fi
		skipped=$(grep -m1 '^SKIPPED: ' /tmp/test.out)
		if [ -n "$skipped" ]; then
			say SKIP "${skipped#SKIPPED: }"
		fi
		if [ "$rc" -ne 0 ]; then
			show /tmp/test.out
		fi
		say END "$n" "$rc"
	done </vmtest/plan
	say DONE
}

run_plan &
wait
# Let the serial port drain before the power goes.
sleep 1
echo o >/proc/sysrq-trigger
sleep 10
