#!/usr/bin/env bash
# Local PostgreSQL + RabbitMQ for developing and testing Tasker on a plain Debian machine.
#
#   deploy/local/services.sh up       # start (or reuse) both, write .tasker/env
#   deploy/local/services.sh status   # what is running, and who started it
#   deploy/local/services.sh env      # print .tasker/env
#   deploy/local/services.sh down     # stop only what this script started
#   deploy/local/services.sh reset    # down, then delete the project-local data
#   deploy/local/services.sh restart-broker [PAUSE_S]  # stop_app, pause, start_app (fault tests)
#   deploy/local/services.sh restart-db [fast|immediate]  # pg_ctl restart (fault tests)
#   deploy/local/services.sh rabbitmqctl ARGS...  # rabbitmqctl against the broker in use (users)
#
# `up` reuses a PostgreSQL that already answers on 127.0.0.1:$TASKER_PG_PORT as user `postgres`
# without a password, and a RabbitMQ that already answers AMQP on 127.0.0.1:$TASKER_AMQP_PORT.
# Otherwise it installs what is missing (apt) and starts project-local instances with their data
# under .tasker/ (git-ignored).
#
# TLS: `up` also makes (once, with openssl) a test CA and a server certificate for localhost and
# 127.0.0.1 under .tasker/tls/, and gives the project-local instances TLS: PostgreSQL `ssl = on`
# (same port) and a RabbitMQ TLS listener on $TASKER_AMQPS_PORT. A project-local broker started
# before without that listener is restarted once to get it. Reused (external) services are left
# as they are. Once each TLS endpoint verified against the CA, .tasker/env also holds
# TASKER_TEST_TLS_CA, TASKER_TEST_AMQPS_URL and TASKER_TEST_DATABASE_TLS_URL (verify-full).
#
# Settings (environment):
#   TASKER_PG_PORT           PostgreSQL port (default 5432)
#   TASKER_AMQP_PORT         RabbitMQ AMQP port (default 5672); Erlang distribution uses port+20000
#   TASKER_AMQPS_PORT        RabbitMQ AMQP-over-TLS port (default TASKER_AMQP_PORT+1)
#   TASKER_SERVICES_TIMEOUT  seconds to wait for a service to come up (default 60)
#   TASKER_STATE_DIR         where state lives (default <repo>/.tasker)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${TASKER_STATE_DIR:-$ROOT/.tasker}
PG_PORT=${TASKER_PG_PORT:-5432}
AMQP_PORT=${TASKER_AMQP_PORT:-5672}
TIMEOUT=${TASKER_SERVICES_TIMEOUT:-60}
HOST=127.0.0.1
DB_NAME=tasker
ENV_FILE=$STATE/env
LOG_DIR=$STATE/logs
# One project-local RabbitMQ node per state directory; the hash keeps two checkouts apart.
HASH=$(printf %s "$STATE" | sha256sum | cut -c1-8)
RMQ_NODE=tasker-$HASH@localhost
RMQ_BASE=$STATE/rabbitmq
# Debian puts the real RabbitMQ scripts here; /usr/sbin/rabbitmq-* are wrappers that switch to the
# `rabbitmq` user and its files, which we do not want for a project-local node.
RMQ_LIBBIN=/usr/lib/rabbitmq/bin

export DEBIAN_FRONTEND=noninteractive

say() { printf '[services] %s\n' "$*"; }
warn() { printf '[services] WARNING: %s\n' "$*" >&2; }
die() {
    printf '[services] ERROR: %s\n' "$*" >&2
    exit 1
}
is_root() { [ "$(id -u)" = 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }

valid_port() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$2" ]; }
valid_port "$PG_PORT" 65535 || die "bad TASKER_PG_PORT '$PG_PORT'"
# The broker's Erlang distribution port is the AMQP port + 20000.
valid_port "$AMQP_PORT" 45535 || die "bad TASKER_AMQP_PORT '$AMQP_PORT' (1..45535)"
AMQPS_PORT=${TASKER_AMQPS_PORT:-$((AMQP_PORT + 1))}
valid_port "$AMQPS_PORT" 65535 || die "bad TASKER_AMQPS_PORT '$AMQPS_PORT'"
case "$AMQPS_PORT" in
"$AMQP_PORT" | "$((AMQP_PORT + 20000))" | "$PG_PORT")
    die "TASKER_AMQPS_PORT $AMQPS_PORT clashes with another port of the services"
    ;;
esac
TLS_DIR=$STATE/tls
# Set when `up` made new certificates: the servers must load them.
TLS_NEW=
# Set once each endpoint answered TLS verified against the test CA.
PG_TLS_OK=
RMQ_TLS_OK=

# --- generic helpers -------------------------------------------------------------------------

# Runs a command as root (directly, or through sudo).
as_root() {
    if is_root; then
        "$@"
    elif have sudo; then
        sudo "$@"
    else
        die "need root for: $* (run as root, or install sudo)"
    fi
}

APT_UPDATED=
apt_install() {
    have apt-get || die "$* missing and apt-get is not available: install it by hand"
    mkdir -p "$LOG_DIR"
    local log=$LOG_DIR/apt.log
    if [ -z "$APT_UPDATED" ]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$log" 2>&1 9>&- ||
            { tail -n 20 "$log" >&2; die "apt-get update failed (log: $log)"; }
        APT_UPDATED=1
    fi
    say "apt-get install $* (log: $log)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
        >>"$log" 2>&1 9>&- ||
        { tail -n 20 "$log" >&2; die "apt-get install $* failed (log: $log)"; }
}

# True when something accepts TCP connections on 127.0.0.1:$1.
tcp_open() {
    # shellcheck disable=SC2016 # $1 expands in the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Waits until "$@" succeeds; gives up after $TIMEOUT seconds.
wait_for() {
    local i
    for ((i = 0; i < TIMEOUT; i++)); do
        "$@" && return 0
        sleep 1
    done
    return 1
}

# --- TLS certificates ------------------------------------------------------------------------

# True when the server certificate under $TLS_DIR is there, valid for at least a day more, and
# signed by the CA next to it.
tls_certs_ok() {
    [ -s "$TLS_DIR/ca.pem" ] && [ -s "$TLS_DIR/server.pem" ] && [ -s "$TLS_DIR/server.key" ] &&
        openssl x509 -checkend 86400 -noout -in "$TLS_DIR/server.pem" >/dev/null 2>&1 &&
        openssl verify -CAfile "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" >/dev/null 2>&1
}

# Makes the test CA and the server certificate (localhost, 127.0.0.1) unless usable ones exist.
tls_up() {
    have openssl || apt_install openssl
    if tls_certs_ok; then
        say "tls: reusing the test CA and server certificate in $TLS_DIR"
        return 0
    fi
    say "tls: making a test CA and a server certificate for localhost and 127.0.0.1 in $TLS_DIR"
    mkdir -p "$TLS_DIR"
    local tmp log=$TLS_DIR/openssl.log
    tmp=$(mktemp -d "$TLS_DIR/.new.XXXXXX")
    (
        set -e
        cd "$tmp"
        umask 077
        openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
            -subj "/CN=Tasker local test CA $HASH" -keyout ca.key -out ca.pem \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
            -keyout server.key -out server.csr
        printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
            -sha256 -extfile server.ext -out server.pem
        chmod 644 ca.pem server.pem
    ) >"$log" 2>&1 9>&- || {
        tail -n 20 "$log" >&2
        rm -rf "$tmp"
        die "openssl failed (log: $log)"
    }
    mv -f "$tmp/ca.key" "$tmp/ca.pem" "$tmp/server.key" "$tmp/server.pem" "$TLS_DIR/"
    rm -rf "$tmp"
    tls_certs_ok || die "the new certificates in $TLS_DIR do not verify (log: $log)"
    TLS_NEW=1
}

# True when a TLS server verified by the test CA for `localhost` answers on 127.0.0.1:$1.
tls_probe() {
    timeout 10 openssl s_client -connect "127.0.0.1:$1" -servername localhost \
        -verify_hostname localhost -CAfile "$TLS_DIR/ca.pem" -verify_return_error \
        </dev/null >/dev/null 2>&1
}

# --- PostgreSQL ------------------------------------------------------------------------------

PG_BIN=
find_pg_bin() {
    PG_BIN=
    local p d
    if p=$(command -v pg_ctl 2>/dev/null) && [ -x "$(dirname "$(readlink -f "$p")")/initdb" ]; then
        PG_BIN=$(dirname "$(readlink -f "$p")")
        return 0
    fi
    # Debian keeps the server binaries off PATH; take the newest version installed.
    for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -t/ -k4,4n); do
        [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && PG_BIN=$d
    done
    [ -n "$PG_BIN" ]
}

psql_cmd() {
    if [ -n "$PG_BIN" ] && [ -x "$PG_BIN/psql" ]; then
        echo "$PG_BIN/psql"
    else
        command -v psql
    fi
}

# psql as `postgres` without a password, exactly as the URLs in .tasker/env connect.
pg_sql() {
    local db=$1
    shift
    env -u PGPASSWORD -u PGSERVICE -u PGHOST -u PGHOSTADDR -u PGUSER -u PGDATABASE \
        PGPASSFILE=/nonexistent/tasker-no-pgpass PGCONNECT_TIMEOUT=5 \
        "$(psql_cmd)" -X -w -q -At -h "$HOST" -p "$PG_PORT" -U postgres -d "$db" "$@"
}

pg_login_ok() { pg_sql postgres -c 'select 1' >/dev/null 2>&1; }

# Runs a PostgreSQL server binary as the owner of the data directory (initdb refuses root).
as_pg_owner() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Where the project-local cluster lives: .tasker/pg, or (root only) a directory under /var/tmp
# that .tasker/pg links to, when the `postgres` user cannot reach the checkout (e.g. under /root).
pg_base() {
    local d=$STATE/pg
    if [ -L "$d" ]; then readlink -f "$d"; else echo "$d"; fi
}

pg_prepare_base() {
    local d=$STATE/pg fb
    if [ -L "$d" ]; then
        fb=$(readlink -f "$d")
        mkdir -p "$fb"
        is_root && chown postgres:postgres "$fb"
        return 0
    fi
    mkdir -p "$d"
    if is_root; then
        id postgres >/dev/null 2>&1 || die "user 'postgres' does not exist (install postgresql)"
        chown postgres:postgres "$d"
        chmod 700 "$d"
        if ! runuser -u postgres -- test -w "$d" 2>/dev/null; then
            fb=/var/tmp/tasker-$HASH/pg
            say "postgres: user 'postgres' cannot reach $d; using $fb (linked from $d)"
            rmdir "$d" 2>/dev/null || die "$d exists and is not usable by user 'postgres'"
            mkdir -p "$fb"
            chmod 755 "$(dirname "$fb")"
            chown postgres:postgres "$fb"
            chmod 700 "$fb"
            ln -s "$fb" "$d"
        fi
    fi
}

# Prints the port of the project-local cluster if it is running (call find_pg_bin first).
pg_local_running_port() {
    local data
    data=$(pg_base)/data
    [ -f "$data/postmaster.pid" ] && [ -n "$PG_BIN" ] || return 1
    as_pg_owner "$PG_BIN/pg_ctl" status -D "$data" >/dev/null 2>&1 || return 1
    sed -n 4p "$data/postmaster.pid"
}

pg_start_local() {
    local base data log
    pg_prepare_base
    base=$(pg_base)
    data=$base/data
    log=$base/postgres.log
    if [ ! -f "$data/PG_VERSION" ]; then
        say "postgres: initdb $data"
        as_pg_owner "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-locale \
            >"$base/initdb.log" 2>&1 || { tail -n 20 "$base/initdb.log" >&2; die "initdb failed"; }
        as_pg_owner tee -a "$data/postgresql.conf" >/dev/null <<'EOF'

# --- added by deploy/local/services.sh ---
listen_addresses = '127.0.0.1'
max_connections = 300
# TCP only: no socket files, no clash with a system cluster.
unix_socket_directories = ''
EOF
    fi
    say "postgres: starting project-local server on $HOST:$PG_PORT (data $data, log $log)"
    as_pg_owner "$PG_BIN/pg_ctl" start -D "$data" -l "$log" -w -t "$TIMEOUT" -o "-p $PG_PORT" \
        >/dev/null 2>&1 9>&- || {
        tail -n 20 "$log" >&2 || true
        die "PostgreSQL did not start within ${TIMEOUT}s (log: $log)"
    }
    wait_for pg_login_ok || die "PostgreSQL started but does not accept connections (log: $log)"
}

pg_up() {
    local local_port=
    find_pg_bin || true
    local_port=$(pg_local_running_port) || local_port=
    if ! find_pg_bin || ! psql_cmd >/dev/null; then
        if tcp_open "$PG_PORT" && psql_cmd >/dev/null; then
            : # a server is already there and we have a client: no need for the server binaries
        else
            say "postgres: server binaries not found; installing"
            pg_install
            find_pg_bin || die "PostgreSQL installed but initdb/pg_ctl not found under /usr/lib/postgresql"
        fi
    fi
    if tcp_open "$PG_PORT"; then
        if pg_login_ok; then
            if [ "$local_port" = "$PG_PORT" ]; then
                say "postgres: project-local server already running on $HOST:$PG_PORT"
            else
                say "postgres: reusing the server on $HOST:$PG_PORT"
            fi
        else
            die "something listens on $HOST:$PG_PORT but 'postgres' cannot log in there without a password; free the port or pick another with TASKER_PG_PORT=55432"
        fi
    elif [ -n "$local_port" ]; then
        die "the project-local PostgreSQL already runs on port $local_port; run '$0 down' first or set TASKER_PG_PORT=$local_port"
    else
        pg_start_local
    fi
    if [ -z "$(pg_sql postgres -c "select 1 from pg_database where datname = '$DB_NAME'")" ]; then
        say "postgres: creating database $DB_NAME"
        pg_sql postgres -c "create database $DB_NAME" >/dev/null 2>&1 ||
            [ -n "$(pg_sql postgres -c "select 1 from pg_database where datname = '$DB_NAME'")" ] ||
            die "could not create database $DB_NAME"
    fi
}

# psql over TLS as the URLs of .tasker/env connect: host localhost, verify-full against the CA.
pg_tls_sql() {
    env -u PGPASSWORD -u PGSERVICE -u PGHOST -u PGHOSTADDR -u PGUSER -u PGDATABASE -u PGSSLMODE \
        PGPASSFILE=/nonexistent/tasker-no-pgpass \
        "$(psql_cmd)" -X -w -q -At \
        "host=localhost port=$PG_PORT user=postgres dbname=postgres connect_timeout=5 sslmode=verify-full sslrootcert=$TLS_DIR/ca.pem" \
        "$@"
}

pg_tls_ok() { [ "$(pg_tls_sql -c 'select ssl from pg_stat_ssl where pid = pg_backend_pid()' 2>/dev/null)" = t ]; }

# Gives the project-local cluster the server certificate and `ssl = on` (a reload is enough).
pg_tls_up() {
    local data local_port f changed=
    find_pg_bin || true
    local_port=$(pg_local_running_port) || local_port=
    if [ "$local_port" != "$PG_PORT" ]; then
        if pg_tls_ok; then
            say "postgres: the reused server on $HOST:$PG_PORT already answers TLS verified by $TLS_DIR/ca.pem"
            PG_TLS_OK=1
        else
            warn "postgres: the reused server on $HOST:$PG_PORT is not project-local: TLS not configured, TASKER_TEST_DATABASE_TLS_URL not written"
        fi
        return 0
    fi
    data=$(pg_base)/data
    for f in server.pem:server.crt server.key:server.key; do
        if ! cmp -s "$TLS_DIR/${f%%:*}" "$data/${f##*:}"; then
            if is_root; then
                install -o postgres -g postgres -m 600 "$TLS_DIR/${f%%:*}" "$data/${f##*:}"
            else
                install -m 600 "$TLS_DIR/${f%%:*}" "$data/${f##*:}"
            fi
            changed=1
        fi
    done
    if [ -n "$changed" ] || [ "$(pg_sql postgres -c 'show ssl')" != on ]; then
        say "postgres: ssl = on with the test server certificate (configuration reload)"
        pg_sql postgres -c "alter system set ssl = on" >/dev/null &&
            pg_sql postgres -c "alter system set ssl_cert_file = 'server.crt'" >/dev/null &&
            pg_sql postgres -c "alter system set ssl_key_file = 'server.key'" >/dev/null &&
            pg_sql postgres -c 'select pg_reload_conf()' >/dev/null ||
            die "could not turn on ssl in PostgreSQL"
    fi
    if wait_for pg_tls_ok; then
        PG_TLS_OK=1
        say "postgres: TLS verified (sslmode=verify-full, host localhost:$PG_PORT)"
    else
        warn "postgres: TLS does not verify on localhost:$PG_PORT (log: $(pg_base)/postgres.log); TASKER_TEST_DATABASE_TLS_URL not written"
    fi
}

pg_install() {
    # Debian's postgresql package would create and start a "main" cluster on 5432 (password auth
    # over TCP) if the machine lets services start; we want none, so switch that off during the
    # install only.
    local conf=/etc/postgresql-common/createcluster.d/zz-tasker-no-main-cluster.conf
    as_root mkdir -p "$(dirname "$conf")"
    echo 'create_main_cluster = false' | as_root tee "$conf" >/dev/null
    local rc=0
    (apt_install postgresql) || rc=$?
    as_root rm -f "$conf"
    [ "$rc" = 0 ] || exit "$rc"
    APT_UPDATED=1
}

pg_down() {
    local data port
    data=$(pg_base)/data
    find_pg_bin || true
    if port=$(pg_local_running_port); then
        say "postgres: stopping the project-local server on $HOST:$port"
        as_pg_owner "$PG_BIN/pg_ctl" stop -D "$data" -m fast -w -t "$TIMEOUT" >/dev/null 2>&1 9>&- ||
            die "pg_ctl stop failed (data $data)"
    else
        say "postgres: no project-local server running (a reused one is left alone)"
    fi
}

pg_status() {
    local port
    find_pg_bin || true
    if port=$(pg_local_running_port); then
        say "postgres: up, project-local, $HOST:$port (data $(pg_base)/data, log $(pg_base)/postgres.log)"
        [ "$port" = "$PG_PORT" ] || warn "postgres: TASKER_PG_PORT is $PG_PORT but the project-local server is on $port"
    elif tcp_open "$PG_PORT"; then
        if psql_cmd >/dev/null 2>&1; then
            if pg_login_ok; then
                say "postgres: up, external (reused), $HOST:$PG_PORT"
            else
                say "postgres: something listens on $HOST:$PG_PORT but 'postgres' cannot log in"
                return 1
            fi
        else
            say "postgres: something listens on $HOST:$PG_PORT (no psql to check it)"
        fi
    else
        say "postgres: down ($HOST:$PG_PORT)"
        return 1
    fi
}

# --- RabbitMQ --------------------------------------------------------------------------------

# True when an AMQP 0.9.1 broker answers on 127.0.0.1:$1: send the protocol header and expect
# the first bytes of a Connection.Start method frame (type 1, channel 0).
amqp_probe() {
    local out
    # shellcheck disable=SC2016 # $1 expands in the inner bash
    out=$(timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "AMQP\0\0\11\1" >&3
        head -c 3 <&3 | od -An -tx1' _ "$1" 2>/dev/null) || return 1
    [ "$(tr -d ' \n' <<<"$out")" = 010000 ]
}

# The TLS listener of the project-local node, in its rabbitmq.conf (between markers, replaced on
# every start so that the port and paths are current).
rmq_tls_conf() {
    local conf=$RMQ_BASE/rabbitmq.conf
    sed -i '/^# --- TLS (services.sh) ---$/,/^# --- end TLS ---$/d' "$conf"
    cat >>"$conf" <<EOF
# --- TLS (services.sh) ---
listeners.ssl.default = $HOST:$AMQPS_PORT
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
# --- end TLS ---
EOF
}

rmq_installed() {
    [ -x "$RMQ_LIBBIN/rabbitmq-server" ] || have rabbitmq-server
}

rmq_bin() {
    if [ -x "$RMQ_LIBBIN/$1" ]; then echo "$RMQ_LIBBIN/$1"; else command -v "$1"; fi
}

# Runs a RabbitMQ command against the project-local node, isolated from the system's files
# (its own HOME for the Erlang cookie, its own config, data and logs), listening on 127.0.0.1
# only (AMQP, Erlang distribution, and epmd if this node is the one that starts it).
rmq_local_env() {
    env HOME="$RMQ_BASE/home" \
        RABBITMQ_NODENAME="$RMQ_NODE" \
        RABBITMQ_NODE_IP_ADDRESS="$HOST" \
        RABBITMQ_NODE_PORT="$AMQP_PORT" \
        RABBITMQ_DIST_PORT="$((AMQP_PORT + 20000))" \
        RABBITMQ_MNESIA_BASE="$RMQ_BASE/mnesia" \
        RABBITMQ_LOG_BASE="$RMQ_BASE/log" \
        RABBITMQ_PID_FILE="$RMQ_BASE/rabbitmq.pid" \
        RABBITMQ_CONF_ENV_FILE="$RMQ_BASE/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$RMQ_BASE/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_BASE/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_BASE/enabled_plugins" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        "$@"
}

rmqctl_local() {
    (cd "$RMQ_BASE" && rmq_local_env timeout 120 "$(rmq_bin rabbitmqctl)" -n "$RMQ_NODE" "$@" 9>&-)
}

# rabbitmqctl against whatever node the system's CLI talks to by default (a reused broker).
rmqctl_system() {
    local ctl
    ctl=$(command -v rabbitmqctl 2>/dev/null) || return 1
    if is_root; then
        timeout 120 "$ctl" "$@" 9>&-
    elif have sudo && sudo -n true 2>/dev/null; then
        timeout 120 sudo -n "$ctl" "$@" 9>&-
    else
        timeout 120 "$ctl" "$@" 9>&-
    fi
}

# Pid of the project-local broker's Erlang VM if it is running.
rmq_local_pid() {
    local pid
    pid=$(cat "$RMQ_BASE/rabbitmq.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    # The node name is not on the VM's command line; its environment says whose node it is.
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "RABBITMQ_NODENAME=$RMQ_NODE" || return 1
    echo "$pid"
}

rmq_local_port() { cat "$RMQ_BASE/port" 2>/dev/null; }

# Makes sure every feature flag (quorum_queue among them) is enabled. $1 = local|system.
rmq_feature_flags() {
    local ctl=rmqctl_$1 flags
    if ! flags=$($ctl -q list_feature_flags name state 2>/dev/null); then
        warn "rabbitmq: cannot reach the broker with rabbitmqctl to check feature flags; make sure 'quorum_queue' is enabled (rabbitmqctl enable_feature_flag all)"
        return 0
    fi
    if grep -qw disabled <<<"$flags"; then
        say "rabbitmq: enabling all feature flags"
        $ctl -q enable_feature_flag all >/dev/null 2>&1 || warn "rabbitmq: 'enable_feature_flag all' failed"
        flags=$($ctl -q list_feature_flags name state 2>/dev/null) || true
    fi
    grep -Eq '^quorum_queue[[:space:]]+enabled' <<<"$flags" ||
        die "rabbitmq: feature flag quorum_queue is not enabled (RabbitMQ >= 3.8 is needed); flags: $(tr '\n' ' ' <<<"$flags")"
    if ! $ctl -q authenticate_user guest guest >/dev/null 2>&1; then
        warn "rabbitmq: user guest/guest cannot authenticate on this broker; TASKER_AMQP_URL will not work as written"
    fi
}

rmq_start_local() {
    local log=$RMQ_BASE/log/startup.log pid dist=$((AMQP_PORT + 20000))
    tcp_open "$dist" && die "port $dist (Erlang distribution for the broker on $AMQP_PORT) is busy; pick another TASKER_AMQP_PORT"
    mkdir -p "$RMQ_BASE/home" "$RMQ_BASE/mnesia" "$RMQ_BASE/log"
    chmod 700 "$RMQ_BASE/home"
    [ -f "$RMQ_BASE/enabled_plugins" ] || echo '[].' >"$RMQ_BASE/enabled_plugins"
    [ -f "$RMQ_BASE/rabbitmq-env.conf" ] || : >"$RMQ_BASE/rabbitmq-env.conf"
    [ -f "$RMQ_BASE/rabbitmq.conf" ] || cat >"$RMQ_BASE/rabbitmq.conf" <<'EOF'
# Project-local broker started by deploy/local/services.sh (listener set by RABBITMQ_NODE_PORT).
loopback_users.guest = true
EOF
    tcp_open "$AMQPS_PORT" && die "port $AMQPS_PORT (the broker's TLS listener) is busy; pick another TASKER_AMQPS_PORT"
    rmq_tls_conf
    echo "$AMQP_PORT" >"$RMQ_BASE/port"
    say "rabbitmq: starting project-local node $RMQ_NODE on $HOST:$AMQP_PORT, TLS on $HOST:$AMQPS_PORT (data $RMQ_BASE, log $RMQ_BASE/log)"
    # setsid: the broker outlives this script; its output goes to a file, never to our pipes.
    (
        cd "$RMQ_BASE" || exit 1
        rmq_local_env setsid -w "$(rmq_bin rabbitmq-server)" </dev/null >"$log" 2>&1 9>&- &
        echo $! >"$RMQ_BASE/launcher.pid"
    )
    pid=$(cat "$RMQ_BASE/launcher.pid")
    local i ok=
    for ((i = 0; i < TIMEOUT; i++)); do
        if amqp_probe "$AMQP_PORT"; then ok=1 && break; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$log" >&2 || true
            die "RabbitMQ exited during startup (log: $log, $RMQ_BASE/log/$RMQ_NODE.log)"
        fi
        sleep 1
    done
    if [ -z "$ok" ]; then
        tail -n 30 "$log" >&2 || true
        die "RabbitMQ did not answer on $HOST:$AMQP_PORT within ${TIMEOUT}s (logs: $log, $RMQ_BASE/log/)"
    fi
    rmqctl_local -q await_startup --timeout "$TIMEOUT" >/dev/null ||
        die "rabbitmqctl await_startup failed for $RMQ_NODE (logs: $RMQ_BASE/log/)"
}

rmq_up() {
    if ! rmq_installed; then
        # Checked before the port: the package may start a broker of its own.
        say "rabbitmq: rabbitmq-server not installed; installing"
        apt_install rabbitmq-server
        rmq_installed || die "rabbitmq-server installed but not found"
        if [ -d /run/systemd/system ] && have systemctl &&
            systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
            say "rabbitmq: the package started the system broker; waiting for it"
            wait_for amqp_probe "$AMQP_PORT" || true
        fi
    fi
    if amqp_probe "$AMQP_PORT"; then
        if rmq_local_pid >/dev/null; then
            say "rabbitmq: project-local node $RMQ_NODE already running on $HOST:$AMQP_PORT"
            rmq_feature_flags local
        else
            say "rabbitmq: reusing the broker on $HOST:$AMQP_PORT"
            rmq_feature_flags system
        fi
    elif tcp_open "$AMQP_PORT"; then
        die "something listens on $HOST:$AMQP_PORT but does not speak AMQP 0.9.1; free the port or set TASKER_AMQP_PORT"
    elif rmq_local_pid >/dev/null; then
        die "the project-local RabbitMQ already runs on port $(rmq_local_port); run '$0 down' first or set TASKER_AMQP_PORT=$(rmq_local_port)"
    else
        rmq_start_local
        rmq_feature_flags local
    fi
}

# The TLS listener: a project-local node without it (started by an older version of this script),
# or started before new certificates were made, is restarted once.
rmq_tls_up() {
    if ! rmq_local_pid >/dev/null; then
        if tls_probe "$AMQPS_PORT"; then
            say "rabbitmq: the reused broker already answers TLS on $HOST:$AMQPS_PORT verified by $TLS_DIR/ca.pem"
            RMQ_TLS_OK=1
        else
            warn "rabbitmq: the reused broker on $HOST:$AMQP_PORT is not project-local: no TLS listener configured, TASKER_TEST_AMQPS_URL not written"
        fi
        return 0
    fi
    if [ -z "$TLS_NEW" ] && tls_probe "$AMQPS_PORT"; then
        say "rabbitmq: TLS on $HOST:$AMQPS_PORT"
        RMQ_TLS_OK=1
        return 0
    fi
    if [ -n "$TLS_NEW" ]; then
        say "rabbitmq: new certificates: restarting the project-local node to load them"
    else
        say "rabbitmq: the project-local node has no TLS listener on $HOST:$AMQPS_PORT: restarting it once with one (connections drop; durable queues survive)"
    fi
    rmq_down
    rmq_start_local
    rmq_feature_flags local
    if wait_for tls_probe "$AMQPS_PORT"; then
        say "rabbitmq: TLS on $HOST:$AMQPS_PORT"
        RMQ_TLS_OK=1
    else
        warn "rabbitmq: no verified TLS on $HOST:$AMQPS_PORT (logs: $RMQ_BASE/log/); TASKER_TEST_AMQPS_URL not written"
    fi
}

rmq_down() {
    local pid
    if pid=$(rmq_local_pid); then
        say "rabbitmq: stopping the project-local node $RMQ_NODE (pid $pid)"
        if ! rmqctl_local -q shutdown >/dev/null 2>&1; then
            warn "rabbitmq: 'rabbitmqctl shutdown' failed; sending SIGTERM"
            kill -TERM "$pid" 2>/dev/null || true
            local i
            for ((i = 0; i < TIMEOUT; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 1
            done
            kill -0 "$pid" 2>/dev/null && die "RabbitMQ (pid $pid) did not stop"
        fi
        rm -f "$RMQ_BASE/rabbitmq.pid"
    else
        say "rabbitmq: no project-local node running (a reused broker is left alone)"
    fi
}

rmq_status() {
    local pid
    if pid=$(rmq_local_pid); then
        say "rabbitmq: up, project-local node $RMQ_NODE, $HOST:$(rmq_local_port) (pid $pid, logs $RMQ_BASE/log)"
        if have openssl && [ -s "$TLS_DIR/ca.pem" ] && tls_probe "$AMQPS_PORT"; then
            say "rabbitmq: TLS on $HOST:$AMQPS_PORT"
        else
            say "rabbitmq: no verified TLS on $HOST:$AMQPS_PORT (run: $0 up)"
        fi
    elif amqp_probe "$AMQP_PORT"; then
        say "rabbitmq: up, external (reused), $HOST:$AMQP_PORT"
    else
        say "rabbitmq: down ($HOST:$AMQP_PORT)"
        return 1
    fi
}

# --- commands --------------------------------------------------------------------------------

write_env() {
    local tmp=$ENV_FILE.tmp.$$
    cat >"$tmp" <<EOF
# Written by deploy/local/services.sh up; load with: . .tasker/env
export TASKER_DATABASE_URL='postgres://postgres@$HOST:$PG_PORT/$DB_NAME'
export TASKER_AMQP_URL='amqp://guest:guest@$HOST:$AMQP_PORT/%2f'
# Admin URL: tests create (and drop) their own databases from it.
export TASKER_TEST_DATABASE_URL='postgres://postgres@$HOST:$PG_PORT/postgres'
export TASKER_TEST_AMQP_URL='amqp://guest:guest@$HOST:$AMQP_PORT/%2f'
# rabbitmqctl for the broker above (tests create per-namespace broker users with it).
export TASKER_TEST_RABBITMQCTL='env TASKER_STATE_DIR=$STATE TASKER_PG_PORT=$PG_PORT TASKER_AMQP_PORT=$AMQP_PORT TASKER_AMQPS_PORT=$AMQPS_PORT bash $ROOT/deploy/local/services.sh rabbitmqctl'
EOF
    if [ -n "$PG_TLS_OK$RMQ_TLS_OK" ]; then
        cat >>"$tmp" <<EOF
# TLS (tests/tests/tls.rs): the test CA; host localhost, as the server certificate names it.
export TASKER_TEST_TLS_CA='$TLS_DIR/ca.pem'
EOF
    fi
    if [ -n "$RMQ_TLS_OK" ]; then
        echo "export TASKER_TEST_AMQPS_URL='amqps://guest:guest@localhost:$AMQPS_PORT/%2f'" >>"$tmp"
    fi
    if [ -n "$PG_TLS_OK" ]; then
        echo "export TASKER_TEST_DATABASE_TLS_URL='postgres://postgres@localhost:$PG_PORT/postgres?sslmode=verify-full&sslrootcert=$TLS_DIR/ca.pem'" >>"$tmp"
    fi
    mv "$tmp" "$ENV_FILE"
}

lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.services.lock"
    flock -w 600 9 || die "another services.sh is running (lock $STATE/.services.lock)"
}

cmd_up() {
    lock
    tls_up
    pg_up
    pg_tls_up
    rmq_up
    rmq_tls_up
    write_env
    local tls=
    [ -n "$PG_TLS_OK" ] && tls="$tls PostgreSQL localhost:$PG_PORT"
    [ -n "$RMQ_TLS_OK" ] && tls="$tls RabbitMQ localhost:$AMQPS_PORT"
    say "ready: PostgreSQL $HOST:$PG_PORT, RabbitMQ $HOST:$AMQP_PORT; TLS:${tls:- none}; environment in $ENV_FILE (. $ENV_FILE)"
}

cmd_down() {
    lock
    rmq_down
    pg_down
}

cmd_reset() {
    cmd_down
    local base
    base=$(pg_base)
    say "deleting project-local data: $base $RMQ_BASE $TLS_DIR $ENV_FILE"
    rm -rf "$base" "$STATE/pg" "$RMQ_BASE" "$TLS_DIR" "$ENV_FILE"
    rmdir "/var/tmp/tasker-$HASH" 2>/dev/null || true
}

cmd_status() {
    local rc=0
    pg_status || rc=1
    rmq_status || rc=1
    if [ -f "$ENV_FILE" ]; then say "env: $ENV_FILE"; else say "env: not written yet (run: $0 up)"; fi
    return "$rc"
}

cmd_env() {
    [ -f "$ENV_FILE" ] || die "$ENV_FILE does not exist; run: $0 up"
    cat "$ENV_FILE"
}

# Restarts whichever broker the scripts use (project-local or reused): the node stays up, every
# connection drops, durable queues and persistent messages survive. Returns once it is back.
cmd_restart_broker() {
    local pause=${1:-3} ctl=rmqctl_system
    rmq_local_pid >/dev/null && ctl=rmqctl_local
    say "rabbitmq: stop_app, ${pause}s pause, start_app"
    $ctl -q stop_app >/dev/null
    sleep "$pause"
    $ctl -q start_app >/dev/null
    wait_for amqp_probe "$AMQP_PORT" || die "RabbitMQ did not come back on port $AMQP_PORT"
    say "rabbitmq: back"
}

# Restarts whichever PostgreSQL the scripts use. MODE fast (default) or immediate (crash-like).
cmd_restart_db() {
    local mode=${1:-fast} data log
    find_pg_bin || die "pg_ctl not found"
    if pg_local_running_port >/dev/null; then
        data=$(pg_base)/data
        log=$(pg_base)/postgres.log
    else
        data=$(pg_sql postgres -c 'show data_directory') || die "cannot ask PostgreSQL for its data directory"
        log=$data/restart.log
    fi
    say "postgres: pg_ctl restart -m $mode ($data)"
    as_pg_owner "$PG_BIN/pg_ctl" restart -D "$data" -m "$mode" -w -t "$TIMEOUT" -l "$log" >/dev/null 2>&1 9>&- ||
        die "pg_ctl restart failed (log: $log)"
    wait_for pg_login_ok || die "PostgreSQL did not come back (log: $log)"
    say "postgres: back"
}

# rabbitmqctl against the broker in use: the project-local node when it runs, else the
# system's CLI (a reused broker). Tests create broker users with it (tests/tests/broker_identity.rs).
cmd_rabbitmqctl() {
    if rmq_local_pid >/dev/null; then
        rmqctl_local "$@"
    else
        rmqctl_system "$@" || die "rabbitmqctl: no project-local node runs and the system's rabbitmqctl failed"
    fi
}

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) cmd_env ;;
reset) cmd_reset ;;
restart-broker) cmd_restart_broker "${2:-3}" ;;
restart-db) cmd_restart_db "${2:-fast}" ;;
rabbitmqctl)
    shift
    cmd_rabbitmqctl "$@"
    ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
