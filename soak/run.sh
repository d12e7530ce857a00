#!/usr/bin/env bash
# The soak (see soak/README.md): builds the release binaries, checks that Debian's tor is
# installed, runs shroud-soak with them and writes its summary to soak/SUMMARY.md.
#
#   soak/run.sh                          # 30 minutes, a fresh seed
#   soak/run.sh --minutes 3 --seed 42    # any shroud-soak flag; later flags win
#
# Exits with shroud-soak's status: 0 PASS, 1 FAIL, 2 bad arguments.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

for tool in tor tor-gencert; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "soak/run.sh: '$tool' is not installed; the soak builds a private Tor network" \
            "from Debian's tor (apt-get install tor)" >&2
        exit 2
    fi
done

cd "$root"
cargo build --release --workspace --bins

target=${CARGO_TARGET_DIR:-$root/target}
bin_dir=$target/release
stamp=$(date -u +%Y%m%dT%H%M%SZ)
# The soak's own binary runs the proxies and clients from --bin-dir, so the release build
# just made is the one under test, whatever else is lying around in target/.
exec "$bin_dir/shroud-soak" \
    --bin-dir "$bin_dir" \
    --log-dir "$target/soak-logs/$stamp" \
    --out "$here/SUMMARY.md" \
    "$@"
