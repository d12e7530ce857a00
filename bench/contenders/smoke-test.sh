#!/bin/bash
# End-to-end smoke test of every benchmark contender on 127.0.0.1.
#
# Usage: smoke-test.sh [all|rathole-tcp|rathole-tls|bore|pagekite|pagekite-tls|ssh ...]
# Env:   BIG_MB   size of the bulk download in MB (default 200)
#        KEEP=1   keep the temp dir (logs, configs) after exit
#
# For each contender it: starts a python http.server origin, starts the
# tunnel server + client exactly as documented in NOTES.md, waits for the
# readiness log line, does a GET with `Host: bench.test`, downloads a
# BIG_MB-MB random file through the tunnel, prints speed and RSS, and kills
# every process it started (by PID). Ports are all picked free at run time
# except bore's control port, which is hard-wired to 7835 in bore 0.6.0.
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
BIG_MB=${BIG_MB:-200}
WORK=$(mktemp -d /tmp/contenders-smoke.XXXXXX)
ALL_PIDS=()   # every PID we started, for the final safety net
CUR_PIDS=()   # PIDs of the contender under test

log() { printf '[smoke] %s\n' "$*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start NAME CMD...   -> runs in background, stdout/stderr to $WORK/NAME.{out,err}
start() {
  local name=$1; shift
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" </dev/null &
  local pid=$!
  CUR_PIDS+=("$pid"); ALL_PIDS+=("$pid")
  echo "$pid" >"$WORK/$name.pid"
  log "started $name pid=$pid: $*"
}

# wait_for FILE FIXED-STRING [TIMEOUT_S]
wait_for() {
  local file=$1 pat=$2 t=${3:-15} i
  for ((i = 0; i < t * 10; i++)); do
    grep -aqF -- "$pat" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  log "TIMEOUT waiting for '$pat' in $file"; tail -5 "$file" >&2
  return 1
}

kill_pids() {
  local p i
  for p in "$@"; do kill "$p" 2>/dev/null; done
  for ((i = 0; i < 30; i++)); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for p in "$@"; do kill -9 "$p" 2>/dev/null; done
}

stop_current() { [ ${#CUR_PIDS[@]} -gt 0 ] && kill_pids "${CUR_PIDS[@]}"; CUR_PIDS=(); }

cleanup() {
  stop_current
  [ ${#ALL_PIDS[@]} -gt 0 ] && kill_pids "${ALL_PIDS[@]}"
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rss() { awk '/VmRSS/{print $2 " kB"}' "/proc/$1/status" 2>/dev/null; }

# check PUBLIC_PORT LABEL PID...
check() {
  local port=$1 label=$2; shift 2
  local body
  body=$(curl -sS -m 10 -H 'Host: bench.test' "http://127.0.0.1:$port/hello.txt")
  if [ "$body" != "hello from origin" ]; then
    log "FAIL $label: GET returned '$body'"; RESULTS+=("$label: FAIL (GET)"); return 1
  fi
  local out
  out=$(curl -sS -m 600 -o /dev/null -H 'Host: bench.test' \
        -w '%{http_code} %{size_download} %{speed_download}' "http://127.0.0.1:$port/big.bin")
  read -r code size speed <<<"$out"
  local want=$((BIG_MB * 1024 * 1024))
  local mbs
  mbs=$(awk -v s="$speed" 'BEGIN{printf "%.1f", s/1048576}')
  local mem="" p
  for p in "$@"; do mem+=" $(cat /proc/$p/comm 2>/dev/null)[$p]=$(rss "$p")"; done
  if [ "$code" = 200 ] && [ "$size" = "$want" ]; then
    RESULTS+=("$label: OK GET; ${BIG_MB}MB in ${mbs} MiB/s; RSS after:$mem")
  else
    RESULTS+=("$label: FAIL bulk (code=$code size=$size)")
  fi
  log "${RESULTS[-1]}"
}

# ---------------------------------------------------------------- origin
mkdir -p "$WORK/www"
echo "hello from origin" >"$WORK/www/hello.txt"
head -c $((BIG_MB * 1024 * 1024)) /dev/urandom >"$WORK/www/big.bin"
ORIGIN_PORT=$(free_port)
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/www" "$ORIGIN_PORT" \
  >"$WORK/origin.out" 2>"$WORK/origin.err" </dev/null &
ALL_PIDS+=($!)
for ((i = 0; i < 50; i++)); do curl -s -o /dev/null "http://127.0.0.1:$ORIGIN_PORT/hello.txt" && break; sleep 0.1; done
log "origin on 127.0.0.1:$ORIGIN_PORT ($WORK/www)"
RESULTS=()

# ---------------------------------------------------------------- rathole
rathole_mode() {   # $1 = tcp | tls
  local mode=$1 d="$WORK/rathole-$1"
  mkdir -p "$d"
  local ctrl pub
  ctrl=$(free_port); pub=$(free_port)
  local srv_tls="" cli_tls=""
  if [ "$mode" = tls ]; then
    "$HERE/make-certs.sh" "$d/certs" benchpass >/dev/null
    srv_tls=$'\n[server.transport.tls]\npkcs12 = "'"$d/certs/server.p12"$'"\npkcs12_password = "benchpass"\n'
    cli_tls=$'\n[client.transport.tls]\ntrusted_root = "'"$d/certs/ca.pem"$'"\nhostname = "localhost"\n'
  fi
  cat >"$d/server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$ctrl"
default_token = "bench-token-0123456789"

[server.transport]
type = "$mode"
$srv_tls
[server.services.bench]
bind_addr = "127.0.0.1:$pub"
EOF
  cat >"$d/client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$ctrl"
default_token = "bench-token-0123456789"

[client.transport]
type = "$mode"
$cli_tls
[client.services.bench]
local_addr = "127.0.0.1:$ORIGIN_PORT"
EOF
  start "rathole-$mode-server" rathole --server "$d/server.toml"
  local spid=${CUR_PIDS[-1]}
  wait_for "$WORK/rathole-$mode-server.out" "Listening at 127.0.0.1:$ctrl" || return 1
  start "rathole-$mode-client" rathole --client "$d/client.toml"
  local cpid=${CUR_PIDS[-1]}
  wait_for "$WORK/rathole-$mode-client.out" "Control channel established" || return 1
  wait_for "$WORK/rathole-$mode-server.out" "Listening at 127.0.0.1:$pub" || return 1
  check "$pub" "rathole-$mode" "$spid" "$cpid"
  stop_current
}

# ---------------------------------------------------------------- bore
run_bore() {
  if ss -Htln 'sport = :7835' | grep -q .; then
    log "bore: port 7835 busy, skipping"; RESULTS+=("bore: SKIP (7835 busy)"); return 1
  fi
  local pub; pub=$(free_port)
  start bore-server env NO_COLOR=1 bore server --bind-addr 127.0.0.1 --secret bench-secret
  local spid=${CUR_PIDS[-1]}
  wait_for "$WORK/bore-server.out" "server listening" || return 1
  start bore-client env NO_COLOR=1 bore local "$ORIGIN_PORT" --local-host 127.0.0.1 \
        --to 127.0.0.1 --port "$pub" --secret bench-secret
  local cpid=${CUR_PIDS[-1]}
  wait_for "$WORK/bore-client.out" "listening at 127.0.0.1:$pub" || return 1
  check "$pub" bore "$spid" "$cpid"
  stop_current
}

# ---------------------------------------------------------------- pagekite
run_pagekite() {   # $1 = plain | tls
  local mode=$1 d="$WORK/pagekite-$1"
  mkdir -p "$d/home"
  local fe; fe=$(free_port)
  local fe_tls=() be_tls=()
  if [ "$mode" = tls ]; then
    "$HERE/make-certs.sh" "$d/certs" >/dev/null
    fe_tls=(--tls_endpoint="localhost:$d/certs/server-bundle.pem")
    be_tls=(--fe_certname=localhost --ca_certs="$d/certs/ca.pem")
  fi
  start "pagekite-$mode-fe" env HOME="$d/home" pagekite --clean --nullui --logfile=stdio \
        --isfrontend --host=127.0.0.1 --ports="$fe" --protos=http \
        --domain="http:bench.test:bench-secret" \
        --max_read_bytes=16000x1 "${fe_tls[@]}"
  local fpid=${CUR_PIDS[-1]}
  wait_for "$WORK/pagekite-$mode-fe.out" "listen=127.0.0.1:$fe;" || return 1
  start "pagekite-$mode-be" env HOME="$d/home" pagekite --clean --nullui --logfile=stdio \
        --frontend="127.0.0.1:$fe" \
        --service_on="http:bench.test:127.0.0.1:$ORIGIN_PORT:bench-secret" \
        --nozchunks --max_read_bytes=16000x1 "${be_tls[@]}"
  local bpid=${CUR_PIDS[-1]}
  wait_for "$WORK/pagekite-$mode-be.out" "FE=127.0.0.1:$fe; proto=http; domain=bench.test; ssl=" 30 || return 1
  check "$fe" "pagekite-$mode" "$fpid" "$bpid"
  stop_current
}

# ---------------------------------------------------------------- ssh -R
run_ssh() {
  local d="$WORK/ssh"
  mkdir -p "$d" /run/sshd
  chmod 755 /run/sshd
  ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$d/host_key"
  ssh-keygen -q -t ed25519 -N '' -C bench-client -f "$d/client_key"
  cp "$d/client_key.pub" "$d/authorized_keys"; chmod 600 "$d/authorized_keys"
  local port; port=$(free_port)
  sed -e "s|{SSH_PORT}|$port|g" -e "s|{SSH_DIR}|$d|g" "$HERE/sshd_config.template" >"$d/sshd_config"
  /usr/sbin/sshd -t -f "$d/sshd_config" || { RESULTS+=("ssh: FAIL (sshd -t)"); return 1; }
  start sshd /usr/sbin/sshd -D -e -f "$d/sshd_config"
  local dpid=${CUR_PIDS[-1]}
  wait_for "$WORK/sshd.err" "Server listening on 127.0.0.1 port $port." || return 1
  start ssh ssh -N -T -p "$port" -i "$d/client_key" \
        -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes \
        -o ServerAliveInterval=0 -o ConnectTimeout=10 \
        -R "0:127.0.0.1:$ORIGIN_PORT" root@127.0.0.1
  local cpid=${CUR_PIDS[-1]}
  wait_for "$WORK/ssh.err" "Allocated port " || return 1
  local pub
  pub=$(sed -n 's/^Allocated port \([0-9]*\) for remote forward to .*/\1/p' "$WORK/ssh.err" | head -1)
  local child; child=$(pgrep -P "$dpid" | head -1)
  check "$pub" "ssh-R" "$dpid" "$child" "$cpid"
  kill_pids "$cpid"           # client first, then sshd (its session child exits with it)
  stop_current
}

[ $# -eq 0 ] && set -- all
for what in "$@"; do
  case $what in
    all) rathole_mode tcp; stop_current; rathole_mode tls; stop_current
         run_bore; stop_current; run_pagekite plain; stop_current
         run_pagekite tls; stop_current; run_ssh; stop_current ;;
    rathole-tcp) rathole_mode tcp ;;
    rathole-tls) rathole_mode tls ;;
    bore) run_bore ;;
    pagekite) run_pagekite plain ;;
    pagekite-tls) run_pagekite tls ;;
    ssh) run_ssh ;;
    *) echo "unknown contender $what" >&2; exit 2 ;;
  esac
  stop_current
done

echo "==== results (work dir $WORK) ===="
printf '%s\n' "${RESULTS[@]}"
