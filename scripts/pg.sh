#!/usr/bin/env bash
# A private PostgreSQL server for tests (Debian's postgresql package): its own data directory,
# Unix socket in that directory, TCP on 127.0.0.1 only, trust authentication for the `ironlab`
# role. PostgreSQL refuses to run as root, so the server runs as the `postgres` user.
#
#   scripts/pg.sh start DIR    initdb (first time) and start; prints the server URL
#                              (postgres://ironlab@127.0.0.1:PORT/postgres) on stdout
#   scripts/pg.sh stop DIR     stop the server and remove DIR
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z $cmd || -z $dir ]]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [[ -z $bin || ! -x $bin/initdb ]]; then
    echo "pg: PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)" >&2
    exit 1
fi
as_pg() { runuser -u postgres -- "$@"; }

case $cmd in
    start)
        mkdir -p "$dir"
        chown postgres: "$dir"
        chmod 700 "$dir"
        if [[ ! -s $dir/data/PG_VERSION ]]; then
            as_pg "$bin/initdb" -D "$dir/data" -U ironlab --auth=trust --encoding=UTF8 \
                --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
                { cat "$dir/initdb.log" >&2; exit 1; }
        fi
        port=""
        for _ in $(seq 1 50); do
            p=$((40000 + RANDOM % 20000))
            if [[ -z $(ss -Htln "( sport = :$p )") ]]; then port=$p; break; fi
        done
        [[ -n $port ]] || { echo "pg: no free port" >&2; exit 1; }
        as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=400" \
            start >/dev/null ||
            { cat "$dir/server.log" >&2; exit 1; }
        echo "postgres://ironlab@127.0.0.1:$port/postgres"
        ;;
    stop)
        if [[ -s $dir/data/postmaster.pid ]]; then
            as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
        fi
        rm -rf "$dir"
        ;;
    *)
        echo "usage: $0 start|stop DIR" >&2
        exit 2
        ;;
esac
