#!/bin/sh
# Runs every fuzz target for EXECS executions, one after the other, and prints a summary.
#
#   fuzz/run.sh EXECS
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Builds once
# (release, with debug assertions and overflow checks; no sanitizer, see README.md), then
# runs each target in process (one job) with -runs=EXECS, starting from its committed seeds
# (seeds/TARGET) and the corpus earlier runs grew (corpus/TARGET, not committed).
# MAX_TIME (seconds, default 1800) caps each target's run; TARGETS (space-separated) picks a
# subset. Logs go to logs/TARGET.log. Exits non-zero if any target crashed or failed.
set -u
cd "$(dirname "$0")" || exit 2
execs=${1:?usage: run.sh EXECS}
max_time=${MAX_TIME:-1800}
flags="-O -a -s none"
toolchain=${FUZZ_TOOLCHAIN:-+nightly}

# shellcheck disable=SC2086
cargo $toolchain fuzz build $flags || exit 2
targets=${TARGETS:-$(cargo $toolchain fuzz list)}
mkdir -p logs
summary=$(mktemp)
failed=0
for target in $targets; do
    mkdir -p "corpus/$target" "seeds/$target" "artifacts/$target"
    before=$(ls "artifacts/$target" | wc -l)
    start=$(date +%s)
    # shellcheck disable=SC2086
    cargo $toolchain fuzz run $flags "$target" "corpus/$target" "seeds/$target" -- \
        -runs="$execs" -max_total_time="$max_time" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"logs/$target.log" 2>&1
    status=$?
    secs=$(($(date +%s) - start))
    after=$(ls "artifacts/$target" | wc -l)
    crashes=$((after - before))
    done_execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$target.log" | tail -1)
    stats=$(grep -E '^#[0-9]+' "logs/$target.log" | grep ' cov: ' | tail -1)
    cov=$(echo "$stats" | sed -n 's/.* cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$stats" | sed -n 's/.* ft: \([0-9]*\).*/\1/p')
    corp=$(echo "$stats" | sed -n 's/.* corp: \([0-9]*\).*/\1/p')
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "logs/$target.log" | tail -1)
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        verdict="FAILED (exit $status)"
    elif [ "${done_execs:-0}" -lt "$execs" ]; then
        verdict="time cap"
    else
        verdict="ok"
    fi
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$target" "${done_execs:-?}" \
        "$secs" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes" "$verdict" \
        | tee -a "$summary"
done
echo
echo "Fuzzing summary: -runs=$execs, cap ${max_time}s per target ($(date -u +%Y-%m-%dT%H:%MZ))"
echo
echo "| target | execs | seconds | exec/s | cov | ft | corpus | new crashes | result |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
cat "$summary"
rm -f "$summary"
exit "$failed"
