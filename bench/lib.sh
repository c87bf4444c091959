# Shared by bench/*.sh (sourced, not run): a temporary `ironlab up` platform on free ports, and
# its clean-up. Needs IRONLAB (the binary) and STOCK (the stock-images dir) set by the caller.
# Sets WORK, UP_PID, IRONLAB_SERVER, IRONLAB_TOKEN; a caller that starts a run sets RUN so the
# clean-up destroys it.
# shellcheck shell=bash

WORK=$(mktemp -d /var/tmp/ironlab-bench.XXXXXX)
# Benchmarks never let a run reach the real network: the worker gets no uplink.
export IRONLAB_UPLINK=none
UP_PID=""
RUN=""

bench_cleanup() {
    set +e
    # BENCH_KEEP_LOG=FILE keeps the platform's log (e.g. to read the worker's own timings).
    if [[ -n ${BENCH_KEEP_LOG:-} ]]; then cp "$WORK/up.log" "$BENCH_KEEP_LOG"; fi
    if [[ -n $RUN ]]; then "$IRONLAB" playground destroy "$RUN" >/dev/null 2>&1; fi
    if [[ -n $UP_PID ]]; then
        kill -TERM "$UP_PID" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$UP_PID" 2>/dev/null
        wait "$UP_PID" 2>/dev/null
    fi
    # Anything a killed worker could leave under the temp data dir.
    grep -F "$WORK" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do umount -l "$m"; done
    losetup -l -n -O NAME,BACK-FILE | awk -v w="$WORK" 'index($2, w) == 1 {print $1}' | while read -r d; do losetup -d "$d"; done
    rm -rf "$WORK"
}
trap bench_cleanup EXIT

# A port P with P and P+1 free (`ironlab up` puts its worker on the next port).
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 20000))
        if [[ -z $(ss -Htln "( sport = :$p or sport = :$((p + 1)) )") ]]; then
            echo "$p"
            return
        fi
    done
    echo "bench: no free port found" >&2
    exit 1
}

# Starts `ironlab up` on 127.0.0.1 with a temp data dir and waits until the API answers.
bench_up() {
    local port
    port=$(free_port)
    export IRONLAB_STOCK_IMAGES=$STOCK
    export IRONLAB_SERVER=http://127.0.0.1:$port
    export XDG_CONFIG_HOME=$WORK/config
    echo "bench: ironlab up on $IRONLAB_SERVER, data dir $WORK/data"
    "$IRONLAB" up --listen "127.0.0.1:$port" --data-dir "$WORK/data" >"$WORK/up.log" 2>&1 &
    UP_PID=$!
    for _ in $(seq 1 600); do
        if [[ -s $WORK/data/admin-token ]] && curl -fsS -o /dev/null -H "Authorization: Bearer $(cat "$WORK/data/admin-token")" "$IRONLAB_SERVER/api/v1/me" 2>/dev/null; then
            break
        fi
        if ! kill -0 "$UP_PID" 2>/dev/null; then
            echo "bench: ironlab up exited:" >&2
            tail -n 30 "$WORK/up.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    IRONLAB_TOKEN=$(cat "$WORK/data/admin-token")
    export IRONLAB_TOKEN
}

# Starts the stock debian playground; prints the run id.
start_run() {
    "$IRONLAB" playground start debian -o json | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n1
}
