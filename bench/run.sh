#!/usr/bin/env bash
# Benchmarks shroud against rathole, bore, PageKite and ssh -R on loopback, and writes
# BENCHMARKS.md (tables), bench/charts/*.png and bench/results.json (every raw figure).
#
#   bench/run.sh            install what is missing, build, run everything (about 12 minutes
#                           of measuring on 2 cores, after the installs and the release build)
#   bench/run.sh --runs 1   any other arguments go to `shroud-bench run` (see --help)
#   bench/run.sh --fleet-only
#                           only forwarding between two proxies of a fleet (about a minute),
#                           replacing just that section of BENCHMARKS.md; needs wrk alone
#
# Installs from the registries this machine reaches: Debian's iperf3, wrk, gnuplot-nox,
# pagekite, openssh and openssl (apt-get, so it wants root or sudo), and rathole and bore from
# crates.io (cargo install, into target/bench-tools). Nothing listens beyond 127.0.0.1, except
# that bore's server always takes port 7835 (bore cannot be told otherwise).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS
step() { printf '\n==== %s (at %ss) ====\n' "$*" "$((SECONDS - started))"; }

# --fleet-only measures shroud alone, with wrk: no other contender is installed for it.
fleet_only=false
for arg in "$@"; do
    if [[ "$arg" == --fleet-only ]]; then fleet_only=true; fi
done

step "System packages"
packages=(iperf3 wrk gnuplot-nox pagekite openssh-server openssh-client openssl libssl-dev pkg-config)
if "$fleet_only"; then packages=(wrk); fi
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=()
    [[ "$(id -u)" -ne 0 ]] && sudo=(sudo -n)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -o Acquire::Retries=2 </dev/null
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
else
    echo "all installed: ${packages[*]}"
fi

tools="$PWD/target/bench-tools"
export PATH="$tools/bin:$PATH"
if ! "$fleet_only"; then
    step "rathole and bore (crates.io)"
    # rathole 0.5.0's TLS transport is native-tls (OpenSSL): hence libssl-dev above. It is the
    # contender's choice, not shroud's; shroud itself never links OpenSSL.
    if ! command -v rathole >/dev/null; then
        # rathole 0.5.0's lock file pins time 0.3.29, which no longer compiles on current Rust
        # (E0282 in time's format_description parser). Install from a copy of its source with
        # only `time` raised to 0.3.36, still --locked.
        if ! cargo install --locked --root "$tools" rathole@0.5.0; then
            src=$(ls -d "$HOME"/.cargo/registry/src/*/rathole-0.5.0 | head -1)
            build=$(mktemp -d)
            cp -r "$src"/. "$build"/
            (cd "$build" && cargo update -p time --precise 0.3.36 &&
                cargo install --locked --root "$tools" --path .)
            rm -rf "$build"
        fi
    fi
    command -v bore >/dev/null || cargo install --locked --root "$tools" bore-cli@0.6.0
    rathole --version
    bore --version
fi

step "Release build of shroud and the bench"
cargo build --release -p shroud-client -p shroud-proxy -p shroud-bench

step "Measuring"
# 10,000 idle visitors need tens of thousands of descriptors across the processes.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
rm -rf bench/logs
target/release/shroud-bench run \
    --out BENCHMARKS.md --charts bench/charts --json bench/results.json --logs bench/logs "$@"

step "Done"
