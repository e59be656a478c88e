#!/usr/bin/env bash
# Compares the CPU per activity of two router builds in the same window, so that the machine's
# noise (shared cores) falls on both alike: each build runs under its own `loadtest` at a flat rate
# (the `peak` scenario without its ramp: one echo bot, 1,000 personal chats, connector latency 0,
# Teams limits lifted), and each router's user + system time is read from /proc over the same 8 s.
# Run it again with the builds swapped. Figures are per answered activity, in microseconds.
#
#   bash scripts/side_by_side.sh BUILD_A BUILD_B [RATE]    (RATE per build, default 1500)
set -euo pipefail
cd "$(dirname "$0")/.."
a=$(realpath "$1")
b=$(realpath "$2")
rate=${3:-1500}
loadtest=target/release/loadtest
[ -x "$loadtest" ] || cargo build --release -p loadtest
scenario=$(mktemp --suffix=.toml)
trap 'rm -f "$scenario"' EXIT
sed -e '/^\[ramp\]/,$d' -e 's/^name = .*/name = "flat"/' loadtest/scenarios/peak.toml > "$scenario"
printf 'rate = %s\nduration_secs = 15\n' "$rate" | cat - "$scenario" > "$scenario.tmp"
mv "$scenario.tmp" "$scenario"

run() {
    TEAMS_ROUTER_BIN=$1 timeout 300 "$loadtest" "$scenario" --duration 20 --quiet \
        --out "$(mktemp -d)" > /dev/null 2>&1
}
run "$a" & run_a=$!
run "$b" & run_b=$!
sleep 7
pid_a=$(pgrep -f "^$a" | head -1)
pid_b=$(pgrep -f "^$b" | head -1)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
a0=$(ticks "$pid_a"); b0=$(ticks "$pid_b")
sleep 8
a1=$(ticks "$pid_a"); b1=$(ticks "$pid_b")
wait "$run_a" "$run_b"
hz=$(getconf CLK_TCK)
activities=$((rate * 8))
echo "A $(( (a1 - a0) * 1000000 / hz / activities )) us/activity  $a"
echo "B $(( (b1 - b0) * 1000000 / hz / activities )) us/activity  $b"
