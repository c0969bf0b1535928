#!/usr/bin/env bash
# Emulate a machine with slower cores on this one, to time a run as it would go there.
#
#   sudo bash experiments/benchmarks/slow_cores.sh start QUOTA_US [PERIOD_US]   # e.g. 120000 100000
#   python experiments/benchmarks/threads.py --profile micro --threads 1 2 --steps 15 --rounds 2
#   ... the run to time ...
#   sudo bash experiments/benchmarks/slow_cores.sh stop
#
# One busy loop pinned to each core, in a cgroup-v1 `cpu` group of overwhelming weight
# (cpu.shares 262144), throttled by CFS bandwidth control to QUOTA_US of CPU time per PERIOD_US
# (default 100000) over all the cores. Both loops are throttled and released together, so for
# the rest of each period every other process has all the cores, together: a two-thread
# computation keeps its two threads in step (a loop per core at a higher nice value instead
# time-slices each core on its own, and a thread waiting at a barrier for its partner, which the
# other core's loop has displaced, cut two-thread training to 1.28 times one thread's throughput,
# where it is 1.84 undisturbed). What is left to the rest is about 1 - QUOTA_US / (cores x
# PERIOD_US) of the machine, for one thread or for all. The kernel hands a group its CPU time in
# slices (sched_cfs_bandwidth_slice_us, 5 ms by default); `start` sets 1 ms, so that both loops
# stop within about a millisecond of each other, and `stop` restores the value it found.
#
# Check the emulation with the thread benchmark above before trusting a time measured under it:
# it slows what runs on the CPU, not the disk or the network. Needs root, cgroup v1's `cpu`
# controller at /sys/fs/cgroup/cpu, and `taskset`.
set -euo pipefail

group=/sys/fs/cgroup/cpu/slow_cores
slice=/proc/sys/kernel/sched_cfs_bandwidth_slice_us
saved="${TMPDIR:-/tmp}/slow_cores.slice_us"
loops=()

undo() {
    if [[ -e "$group" ]]; then
        xargs -r kill < "$group/tasks" || true
        # cgroupfs files report a size of 0, so read the list rather than test its size
        while [[ -n "$(cat "$group/tasks")" ]]; do sleep 0.1; done
        rmdir "$group"
    fi
    if [[ -f "$saved" ]]; then
        cat "$saved" > "$slice"
        rm -f "$saved"
    fi
}

case "${1:-}" in
start)
    quota="${2:?usage: slow_cores.sh start QUOTA_US [PERIOD_US]}"
    period="${3:-100000}"
    if [[ -e "$group" ]]; then
        echo "slow_cores.sh: $group exists: already started (run 'stop' first)" >&2
        exit 1
    fi
    # a write that fails midway (no bandwidth control, no taskset, ...) leaves nothing behind:
    # the loops started so far are killed, the group removed and the slice restored
    trap 'echo "slow_cores.sh: start failed; undone" >&2; kill "${loops[@]}" 2> /dev/null || true; undo' ERR
    mkdir "$group"
    echo 262144 > "$group/cpu.shares"
    echo "$period" > "$group/cpu.cfs_period_us"
    echo "$quota" > "$group/cpu.cfs_quota_us"
    cat "$slice" > "$saved"
    echo 1000 > "$slice"
    for ((core = 0; core < $(nproc); core++)); do
        taskset -c "$core" bash -c 'while :; do :; done' > /dev/null 2>&1 < /dev/null &
        loops+=("$!")
        echo "$!" > "$group/tasks"
    done
    trap - ERR
    echo "slow_cores.sh: $(nproc) loops at $quota us per $period us; about" \
        "$(awk -v q="$quota" -v p="$period" -v n="$(nproc)" 'BEGIN { printf "%.2f", 1 - q / (n * p) }')" \
        "of the machine is left"
    ;;
stop)
    undo
    ;;
*)
    echo "usage: slow_cores.sh start QUOTA_US [PERIOD_US] | stop" >&2
    exit 2
    ;;
esac
