#!/bin/sh
# Captures real first flights into the seed corpora: ClientHellos from curl, openssl
# s_client and Chromium (if installed) under tls_client_hello/, and request heads from curl
# and Chromium under http_head/. Each client is pointed at a local listener (capture.py)
# that records what it sends and answers nothing. Then split-record variants of every
# captured hello are made (split_records.py). Run from anywhere; needs python3.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tls=$here/tls_client_hello
http=$here/http_head
mkdir -p "$tls" "$http"
port=${CAPTURE_PORT:-18443}
name=example.test

# capture PREFIX CMD...: run CMD against a fresh one-connection listener.
capture() {
    prefix=$1
    shift
    ready=$(mktemp -u)
    READY=$ready python3 "$here/capture.py" "$port" "$prefix" 1 &
    listener=$!
    while [ ! -e "$ready" ]; do sleep 0.1; done
    rm -f "$ready"
    "$@" >/dev/null 2>&1 || true
    wait "$listener"
    mv "$prefix-0" "$prefix"
}

url="https://$name:$port/"
resolve="$name:$port:127.0.0.1"
capture "$tls/curl" curl -sk --max-time 3 --resolve "$resolve" "$url"
capture "$tls/curl-tls12" curl -sk --max-time 3 --tlsv1.2 --tls-max 1.2 --resolve "$resolve" "$url"
capture "$tls/curl-http1" curl -sk --max-time 3 --http1.1 --resolve "$resolve" "$url"
capture "$tls/openssl" sh -c "echo | timeout 3 openssl s_client -connect 127.0.0.1:$port -servername $name -alpn h2,http/1.1"
capture "$tls/openssl-nosni" sh -c "echo | timeout 3 openssl s_client -connect 127.0.0.1:$port -noservername"
# A post-quantum key share from openssl needs OpenSSL 3.5 or newer.
if openssl list -kem-algorithms 2>/dev/null | grep -qi mlkem; then
    capture "$tls/openssl-mlkem" sh -c "echo | timeout 3 openssl s_client -connect 127.0.0.1:$port -servername $name -groups X25519MLKEM768"
fi

capture "$http/curl" curl -s --max-time 3 --resolve "$resolve" "http://$name:$port/some/path?q=1"
capture "$http/curl-proxy-form" curl -s --max-time 3 -x "http://127.0.0.1:$port" "http://$name/absolute?form"

chromium=$(command -v chromium || command -v chromium-browser || true)
if [ -n "$chromium" ]; then
    chrome() {
        profile=$(mktemp -d)
        timeout 15 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic \
            --no-first-run --disable-background-networking --disable-component-update \
            --disable-sync --user-data-dir="$profile" \
            --host-resolver-rules="MAP $name 127.0.0.1" --dump-dom "$1"
        rm -rf "$profile"
    }
    capture "$tls/chromium" chrome "https://$name:$port/"
    capture "$http/chromium" chrome "http://$name:$port/index.html"
fi

python3 "$here/split_records.py" "$tls"
