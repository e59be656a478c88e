#!/usr/bin/env bash
# The router alone past its knee: it runs on core 0 beside two busy loops (about a third of a
# core), the harness on core 1, so that the router and not the harness is what saturates. The
# `peak` scenario (one echo bot, 1,000 personal chats, connector latency 0, Teams limits lifted),
# from 2,000/s in steps of 500/s until the end-to-end p99 passes four seconds. Extra arguments
# are KEY=VALUE settings for the router's environment, e.g.
# TEAMS_ROUTER__ADMISSION__TARGET_ARRIVAL_DELAY_MS=0 to compare with that rule off.
#
#   bash scripts/pinned_peak.sh ROUTER_BINARY OUT_DIR [KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
router=$(realpath "$1")
out=$2
shift 2
loadtest=target/release/loadtest
[ -x "$loadtest" ] || cargo build --release -p loadtest
work=$(mktemp -d)
busy=()
cleanup() {
    [ ${#busy[@]} -eq 0 ] || kill "${busy[@]}" 2> /dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
sed -e 's/^name = .*/name = "peak-pinned"/' -e 's/^start_rate = .*/start_rate = 2000/' \
    loadtest/scenarios/peak.toml > "$work/peak-pinned.toml"
{
    echo '#!/usr/bin/env bash'
    for setting in "$@"; do printf 'export %q\n' "$setting"; done
    printf 'exec taskset -c 0 %q "$@"\n' "$router"
} > "$work/router.sh"
chmod +x "$work/router.sh"
for _ in 1 2; do
    taskset -c 0 sh -c 'while :; do :; done' &
    busy+=($!)
done
TEAMS_ROUTER_BIN="$work/router.sh" taskset -c 1 "$loadtest" "$work/peak-pinned.toml" --quiet \
    --out "$out"
