#!/usr/bin/env bash
# Runs a 3-replica store on this machine, no Docker needed:
#   replicas 1..3 on 127.0.0.1:7001..7003, data under ${CHAT_LOCAL_DIR:-.local}/store.
# Ctrl-C (or SIGTERM) stops all three gracefully; data is kept for the next run.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p chat-store -p chatctl
data="${CHAT_LOCAL_DIR:-.local}/store"
mkdir -p "$data"
peers="1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003"
pids=()
stop() {
    trap - INT TERM EXIT
    [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    wait
}
trap stop INT TERM EXIT
for i in 1 2 3; do
    target/release/chat-store --id "$i" --listen "127.0.0.1:700$i" --peers "$peers" \
        --data-dir "$data/$i" >>"$data/replica-$i.log" 2>&1 &
    pids+=($!)
done
echo "store replicas running (pids ${pids[*]}); logs in $data/replica-*.log"
echo "try: target/release/chatctl --store 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 status"
wait
