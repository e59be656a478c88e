#!/usr/bin/env bash
# The README's test command. On a fresh Debian machine with only a Rust toolchain it first installs
# what the tests need beyond cargo, when missing:
#   redis-server and promtool (Debian packages redis-server and prometheus, with apt as root);
#   schemathesis (PyPI), into a virtual environment of the project's own (target/tools/venv).
# Then it runs the default suite (`cargo test --workspace`; the smoke load scenario is one of its
# tests, `tests/load.rs`, against the debug router).
# `--long` (or TEAMS_ROUTER_LONG=1) runs every test at its full size (README, "Testing").
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  --long) export TEAMS_ROUTER_LONG=1 ;;
  "") ;;
  *) echo "usage: $0 [--long]" >&2; exit 2 ;;
esac

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: $1 is missing and installing it needs root (apt-get install $2)" >&2
    exit 1
  fi
}

apt_packages=()
command -v redis-server >/dev/null 2>&1 || apt_packages+=(redis-server)
command -v promtool >/dev/null 2>&1 || apt_packages+=(prometheus)
venv="target/tools/venv"
if [ ! -x "$venv/bin/python" ] && ! python3 -m venv --help >/dev/null 2>&1; then
  apt_packages+=(python3-venv)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  need_root "${apt_packages[*]}" "${apt_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/schemathesis" ]; then
  command -v python3 >/dev/null 2>&1 || { need_root python3 python3; apt-get install -y -qq python3 >/dev/null; }
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check schemathesis
fi
export PATH="$PWD/$venv/bin:$PATH"

echo "tools: $(redis-server --version | cut -d' ' -f1-3), $(promtool --version 2>&1 | head -1 | cut -d' ' -f1-3), schemathesis $(schemathesis --version | awk '{print $NF}')"

cargo test --workspace

# Long mode: the smoke load run against the release router too. Both binaries come from one
# build, so cargo resolves features once and compiles each crate once (`cargo run -p loadtest`
# and the router built on its own would each resolve their own set, and rebuild most of the graph).
if [ "${TEAMS_ROUTER_LONG:-0}" != 0 ]; then
  cargo build --release -p teams-router -p loadtest --bins
  target_dir="${CARGO_TARGET_DIR:-target}"
  TEAMS_ROUTER_BIN="$target_dir/release/teams-router" "$target_dir/release/loadtest" smoke
fi
