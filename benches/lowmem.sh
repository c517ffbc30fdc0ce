#!/usr/bin/env bash
# Decode speed under cgroup-v1 memory limits: ggpt before/after and llama.cpp, back to back.
#
#   sudo bash benches/lowmem.sh [FILE:LIMIT_MIB[,LIMIT_MIB...] ...]
#
# Default cases: /tmp/med-gguf/med-Q4_K_M.gguf at 320/256/200 MiB and med-F16.gguf at
# 600/400/300 MiB. Each file is first copied to a private directory, so that no other process
# has its pages mapped (mapped pages survive drop_caches and are charged to the group that
# first touched them). For each file: its cold O_DIRECT read bandwidth (dd), then for each limit,
# each program in turn: page cache dropped, a fresh child of /sys/fs/cgroup/memory with
# memory.limit_in_bytes set, the program started inside it (a shell writes its pid to
# cgroup.procs, then execs), -n 64 greedy tokens on 2 threads. Printed per run: decode t/s,
# the group's peak usage, OOM kills, exit status, the device's reads per evaluated token
# (/proc/diskstats) and the vCPUs' steal time (/proc/stat; both machine-wide, so the host must
# be quiet). For the streaming ggpt run also the streamed MB per token, the share of the token
# loop's time spent waiting for reads, the disk roofline (dd bandwidth / streamed bytes), and
# the roofline proper: the lower of that and the unconstrained run's speed.
# Per file, the unconstrained run is followed by the same run with a dd reading the file beside
# it: what reading alone costs a decode on this machine.
#
# Environment: BEFORE (default /tmp/ggpt-main0), AFTER (default target/release/ggpt),
# LLAMA_DIR (default /work/llama.cpp/build/bin; llama-bench -p 0 -n 64 -r 1, with --repack 0 where it has it),
# N (64), THREADS (2), TIMEOUT (seconds per run, 300; a run cut off prints rc 124). Needs root (drop_caches, cgroups) and a cgroup v1 memory controller.
set -u
BEFORE=${BEFORE:-/tmp/ggpt-main0}
AFTER=${AFTER:-target/release/ggpt}
LLAMA_DIR=${LLAMA_DIR:-/work/llama.cpp/build/bin}
N=${N:-64}
THREADS=${THREADS:-2}
TIMEOUT=${TIMEOUT:-300}
CG_ROOT=/sys/fs/cgroup/memory
PROMPT="The meaning of life is"

if [ ! -f "$CG_ROOT/memory.limit_in_bytes" ]; then
    echo "no cgroup v1 memory controller at $CG_ROOT" >&2
    exit 1
fi
if [ "$#" -eq 0 ]; then
    set -- /tmp/med-gguf/med-Q4_K_M.gguf:320,256,200 /tmp/med-gguf/med-F16.gguf:600,400,300
fi

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# Builds that repack weights at load (newer than early 2025) are asked not to, so that both
# programs read the file as it is; older llama-bench builds do not know the flag.
REPACK=()
if LD_LIBRARY_PATH="$LLAMA_DIR" "$LLAMA_DIR/llama-bench" --help 2>&1 | grep -q -- --repack; then
    REPACK=(--repack 0)
fi

# run_limited LIMIT_MIB OUT CMD...: CMD inside a fresh group; prints "peak_mib oom_kills rc".
run_limited() {
    local limit=$1 out=$2; shift 2
    local cg="$CG_ROOT/ggpt-lowmem-$$"
    rmdir "$cg" 2>/dev/null
    mkdir "$cg" || return 1
    echo $((limit * 1024 * 1024)) > "$cg/memory.limit_in_bytes"
    drop_caches
    local r0 r1 m
    r0=$(sectors_read)
    m=$(steal_mark)
    sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" timeout "$TIMEOUT" "$@" > "$out" 2>&1
    local rc=$?
    local steal
    steal=$(steal_since "$m")
    r1=$(sectors_read)
    local peak oom
    peak=$(( $(cat "$cg/memory.max_usage_in_bytes") / 1048576 ))
    oom=$(awk '$1 == "oom_kill" {print $2}' "$cg/memory.oom_control")
    rmdir "$cg"
    # Device reads per evaluated token: N generated plus one pass over the prompt (ggpt) or
    # llama-bench's one-token warm-up; the whole machine's reads, so run it on a quiet host.
    local mb_tok="?"
    if [ -n "$r0" ] && [ -n "$r1" ]; then
        mb_tok=$(awk -v a="$r0" -v b="$r1" -v n="$N" 'BEGIN {printf "%.0f", (b - a) * 512 / 1e6 / (n + 1)}')
    fi
    echo "$peak ${oom:-?} $rc $mb_tok $steal"
}

# The machine's steal time (clock ticks the hypervisor ran something else while a vCPU had
# work): steal_mark prints the counter and the time now; steal_since MARK prints the steal
# since then as a share of all vCPUs' time, in %.
steal_mark() { echo "$(awk '$1 == "cpu" {print $9}' /proc/stat) $(date +%s.%N)"; }
steal_since() {
    local now
    now=$(steal_mark)
    awk -v m="$1" -v now="$now" -v hz="$(getconf CLK_TCK)" -v n="$(nproc)" \
        'BEGIN {split(m, a, " "); split(now, b, " "); printf "%.1f", 100 * (b[1] - a[1]) / hz / ((b[2] - a[2]) * n)}'
}

# Sectors read so far from $DEV, the block device holding the file under test (nothing when
# /proc/diskstats does not list it, e.g. a file on overlay or tmpfs: the column then shows "?").
sectors_read() {
    awk -v d="$DEV" '$3 == d {print $6}' /proc/diskstats
}

ggpt_tps() { sed -n 's/.* eval time = .*, *\([0-9.]*\) tokens per second)/\1/p' "$1" | tail -1; }
llama_tps() { awk -F'","' '/^"/ {v=$(NF-1)} END {print v+0}' "$1"; }

printf '# load: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '| file | limit MiB | program | decode t/s | peak MiB | OOM kills | rc | disk MB/token | steal %% | note |\n'
printf '|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n'
for case in "$@"; do
    file=${case%%:*}
    limits=${case#*:}
    name=$(basename "$file" .gguf)
    private=$(mktemp -d)
    cp "$file" "$private/" || exit 1
    file="$private/$name.gguf"
    DEV=$(basename "$(df --output=source "$file" | tail -1)")
    drop_caches
    bw=$(dd if="$file" of=/dev/null bs=8M iflag=direct 2>&1 | awk '/copied/ {print $(NF-1), $NF}')
    printf '| %s | - | disk (dd O_DIRECT, cold) | - | - | - | - | - | - | %s |\n' "$name" "$bw"
    bw_mbs=$(echo "$bw" | awk '{v=$1; if ($2 ~ /^GB/) v*=1000; print v}')
    tmp=$(mktemp)
    # Unconstrained reference (default context).
    drop_caches
    m=$(steal_mark)
    "$AFTER" run -m "$file" -p "$PROMPT" -n "$N" --temp 0 -t "$THREADS" --ignore-eos > "$tmp" 2>&1
    rc=$?
    steal=$(steal_since "$m")
    unconstrained=$(ggpt_tps "$tmp")
    printf '| %s | none | ggpt after | %s | - | - | %s | - | %s | |\n' "$name" "$unconstrained" "$rc" "$steal"
    # What reading costs a decode that never touches the disk: the same in-memory run (page
    # cache warm) with a cold O_DIRECT reader of the file beside it. On a virtual machine whose
    # block device is emulated by host threads that share the vCPUs' CPU time (a Firecracker
    # guest), the reads show up as steal time and slow the decode although dd itself uses
    # almost no guest CPU.
    (while :; do dd if="$file" of=/dev/null bs=8M iflag=direct 2> /dev/null; done) &
    reader=$!
    sleep 0.3
    s0=$(sectors_read)
    m=$(steal_mark)
    "$AFTER" run -m "$file" -p "$PROMPT" -n "$N" --temp 0 -t "$THREADS" --ignore-eos > "$tmp" 2>&1
    steal=$(steal_since "$m")
    t1=$(date +%s.%N)
    s1=$(sectors_read)
    kill "$reader"
    pkill -P "$reader" dd
    wait "$reader" 2> /dev/null
    dd_beside=$(awk -v s0="${s0:-0}" -v s1="${s1:-0}" -v m="$m" -v t1="$t1" \
        'BEGIN {split(m, a, " "); printf "%.0f", (s1 - s0) * 512 / (t1 - a[2]) / 1e6}')
    printf '| %s | none | ggpt after, dd reading beside it | %s | - | - | - | - | %s | dd read %s MB/s beside it |\n' \
        "$name" "$(ggpt_tps "$tmp")" "$steal" "$dd_beside"
    for limit in ${limits//,/ }; do
        for prog in before after llama; do
            case $prog in
            before | after)
                bin=$BEFORE
                [ "$prog" = after ] && bin=$AFTER
                r=$(run_limited "$limit" "$tmp" "$bin" run -m "$file" -p "$PROMPT" -n "$N" \
                    --temp 0 -t "$THREADS" --ignore-eos)
                tps=$(ggpt_tps "$tmp")
                note=""
                streamed=$(sed -n 's/.*streaming \([0-9.]*\) MB per token.*/\1/p' "$tmp" | tail -1)
                reads=$(sed -n 's/.*storage reads *= *\([0-9.]*\) MB.*/\1/p' "$tmp" | tail -1)
                waited=$(sed -n 's/.*waited for reads = .*(\([0-9.]*\) % of eval time).*/\1/p' "$tmp" | tail -1)
                if [ -n "$streamed" ]; then
                    roof=$(awk -v b="$bw_mbs" -v s="$streamed" 'BEGIN {printf "%.2f", b / s}')
                    pct=$(awk -v t="${tps:-0}" -v r="$roof" 'BEGIN {printf "%.0f", 100 * t / r}')
                    # No run outpaces the same run in memory: the roofline is the lower bound.
                    both=$(awk -v r="$roof" -v u="${unconstrained:-0}" 'BEGIN {if (u > 0 && u < r) r = u; printf "%.2f", r}')
                    bpct=$(awk -v t="${tps:-0}" -v r="$both" 'BEGIN {printf "%.0f", 100 * t / r}')
                    note="streams $streamed MB/token (read $reads), waited ${waited:-?} %, disk roofline $roof t/s (${pct} %), min(disk, in memory) $both t/s (${bpct} %)"
                elif [ -n "$reads" ]; then
                    note="reads $reads MB/token"
                fi
                ;;
            llama)
                r=$(LD_LIBRARY_PATH="$LLAMA_DIR" run_limited "$limit" "$tmp" \
                    "$LLAMA_DIR/llama-bench" -m "$file" -t "$THREADS" -p 0 -n "$N" -r 1 \
                    "${REPACK[@]}" -o csv)
                tps=$(llama_tps "$tmp")
                note="llama-bench"
                ;;
            esac
            read -r peak oom rc disk steal <<< "$r"
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$limit" "$prog" \
                "${tps:-fail}" "$peak" "$oom" "$rc" "$disk" "$steal" "$note"
        done
    done
    rm -f "$tmp"
    rm -rf "$private"
done
printf '# load: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
