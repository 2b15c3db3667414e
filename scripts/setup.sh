#!/usr/bin/env bash
# Installs what kiln needs on Debian/Ubuntu (OpenMPI, libclang for the MPI bindings, iproute2 for
# the multi-host test) and builds the release binary. Safe to run again.
set -euo pipefail
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
# `ip` makes the two namespace hosts of tests/multinode.rs; slim Debian images lack iproute2.
command -v ip >/dev/null || need+=(iproute2)
for pkg in libopenmpi-dev libclang-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if (( ${#need[@]} )); then
  sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update
  $sudo apt-get install -y "${need[@]}"
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup first" >&2; exit 2; }
cargo build --release
