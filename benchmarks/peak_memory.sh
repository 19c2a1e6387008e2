#!/usr/bin/env bash
# Benchmark: run a command inside a memory cgroup capped at BYTES and report its peak memory.
#
#   benchmarks/peak_memory.sh BYTES LOG COMMAND...      e.g. benchmarks/peak_memory.sh $((3540*1048576)) rss.log refusalkit run
#
# Needs a writable cgroup-v1 memory hierarchy (/sys/fs/cgroup/memory; root in a container). Samples VmRSS,
# RssAnon and RssFile of the command every 0.5 s into LOG, then prints: the exit status and wall time, the
# cgroup's peak usage and how often it hit the cap (page cache reclaimed), whether the OOM killer ran, and the
# peak RSS / anonymous / file-backed memory. A command that finishes under the cap needs at most BYTES.
set -u
lim=$1; log=$2; shift 2
cg=/sys/fs/cgroup/memory/refusalkit-peak-$$
mkdir -p "$cg" && echo "$lim" > "$cg/memory.limit_in_bytes" || { echo "cannot create a memory cgroup at $cg" >&2; exit 2; }
t0=$(date +%s)
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cg" "$@" & pid=$!
: > "$log"
while kill -0 "$pid" 2>/dev/null; do
  awk '/VmRSS|RssAnon|RssFile/{printf "%s %d ", $1, $2/1024} END{print ""}' "/proc/$pid/status" 2>/dev/null >> "$log"
  sleep 0.5
done
wait "$pid"; rc=$?
echo "exit $rc after $(( $(date +%s) - t0 )) s; cap $((lim / 1048576)) MiB, cgroup peak $(( $(cat "$cg/memory.max_usage_in_bytes") / 1048576 )) MiB, cap hit $(cat "$cg/memory.failcnt") times, $(grep oom_kill "$cg/memory.oom_control" | tr '\n' ' ')"
awk '{for(i=1;i<=NF;i++){if($i=="VmRSS:")r=($(i+1)>r?$(i+1):r); if($i=="RssAnon:")a=($(i+1)>a?$(i+1):a); if($i=="RssFile:")f=($(i+1)>f?$(i+1):f)}}
     END{print "peak RSS " r " MiB, peak anonymous " a " MiB, peak file-backed " f " MiB"}' "$log"
rmdir "$cg" 2>/dev/null
exit "$rc"
