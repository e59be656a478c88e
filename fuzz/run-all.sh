#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each, on the stable toolchain, from the
# committed corpus; new inputs go to a scratch corpus so the committed one only grows on purpose.
# BUILD is `-O` (optimized, the default: long runs) or `--dev` (unoptimized, debug assertions on:
# builds in half the time, for the seconds-long smoke run of CI).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
build="${2:--O}"
case "$build" in
  -O|--dev) ;;
  *) echo "usage: $0 [SECONDS] [-O|--dev]" >&2; exit 2 ;;
esac
targets=(activity_envelope jwt_unverified admin_bodies config_toml webhook_answer openai_sse)
cargo fuzz build --sanitizer none "$build"
for target in "${targets[@]}"; do
  scratch="target/corpus-run/$target"
  mkdir -p "$scratch"
  echo "== $target: ${seconds}s"
  cargo fuzz run --sanitizer none "$build" "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    2>&1 | grep -E '^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|panicked|thread)' || true
  if [ -d "artifacts/$target" ] && [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
    echo "!! $target found crashing inputs in fuzz/artifacts/$target" >&2
    exit 1
  fi
done
