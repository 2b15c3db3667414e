#!/usr/bin/env bash
# Installs what kiln needs on Debian/Ubuntu (OpenMPI, libclang for the MPI bindings) and builds
# the release binary. Safe to run again.
set -euo pipefail
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
for pkg in libopenmpi-dev libclang-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if (( ${#need[@]} )); then
  sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update
  $sudo apt-get install -y openmpi-bin libopenmpi-dev libclang-dev pkg-config
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup first" >&2; exit 2; }
cargo build --release
