#!/usr/bin/env bash
# Back-to-back serving benchmark: ggpt-serve and llama-server on the same GGUF file, one after
# the other, alternating for ROUNDS rounds, each level of benches/serve_load.py against each.
# Run by hand (not in CI). Nothing is built or downloaded: pass the binaries.
#
#   LLAMA_SERVER=/path/to/llama-server GGPT_SERVE=target/release/ggpt-serve \
#     bash benches/serve_compare.sh model.gguf [STREAMS] [MAX_TOKENS] [ROUNDS]
#
# ggpt-serve: --parallel 16 --ctx 1024 -t 2. llama-server: -np 8 -c 8192 -t 2 (continuous
# batching is on by default), plus $LLAMA_EXTRA (e.g. -nr where its repacked CPU buffers
# crash). Prints one JSON line per level, tagged with the server, the round and `uptime`.
set -euo pipefail
model=${1:?usage: serve_compare.sh MODEL.gguf [STREAMS] [MAX_TOKENS] [ROUNDS]}
streams=${2:-1,2,4,8,16}
max_tokens=${3:-64}
rounds=${4:-2}
ggpt=${GGPT_SERVE:-target/release/ggpt-serve}
llama=${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}
port=${PORT:-18180}
here=$(cd "$(dirname "$0")" && pwd)
name=$(basename "$model" .gguf)
pid=

stop() {
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=
    fi
}
trap stop EXIT

wait_ready() {
    for _ in $(seq 1 600); do
        if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then echo "server exited" >&2; return 1; fi
        sleep 0.5
    done
    echo "server not ready after 300 s" >&2
    return 1
}

one() { # server label
    local label=$1
    case $label in
    ggpt) "$ggpt" -m "$model" --parallel 16 --ctx 1024 -t 2 --port "$port" 2>/dev/null & ;;
    llama) "$llama" -m "$model" -np 8 -c 8192 -t 2 --port "$port" ${LLAMA_EXTRA:-} >/dev/null 2>&1 & ;;
    esac
    pid=$!
    wait_ready
    python3 "$here/serve_load.py" --base "http://127.0.0.1:$port/v1" --model "$name" \
        --streams "$streams" --requests 1 --max-tokens "$max_tokens" |
        while read -r line; do
            echo "{\"server\": \"$label\", \"round\": $r, \"uptime\": \"$(uptime | sed 's/.*load average: //')\", \"level\": $line}"
        done
    stop
}

for r in $(seq 1 "$rounds"); do
    one ggpt
    one llama
done
