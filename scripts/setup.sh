#!/usr/bin/env bash
# Installs what kiln needs on Debian/Ubuntu (OpenMPI, libclang for the MPI bindings, iproute2 for
# the multi-host test) and builds the release binary. Safe to run again.
#
# `--cuda` also prepares the `cuda` feature's build (issue 11) and builds nothing; then run
# `cargo build --release --features cuda`. See prepare_llvm_stand_in below for why.
set -euo pipefail
cuda=0
case "${1:-}" in
  "") ;;
  --cuda) cuda=1 ;;
  *) echo "usage: scripts/setup.sh [--cuda]" >&2; exit 2 ;;
esac
need=()
command -v mpirun >/dev/null || need+=(openmpi-bin)
# `ip` makes the two namespace hosts of tests/multinode.rs; slim Debian images lack iproute2.
command -v ip >/dev/null || need+=(iproute2)
for pkg in libopenmpi-dev libclang-dev pkg-config; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# The cuda build links LLVM (cubecl-cuda → cubecl-llvm): Debian's LLVM 22 with its static
# libraries; llvm-config --link-static also lists Polly and zstd, whose archives must exist.
if (( cuda )); then
  for pkg in llvm-22-dev libpolly-22-dev libzstd-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
fi
if (( ${#need[@]} )); then
  sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update
  $sudo apt-get install -y "${need[@]}"
fi

# burn's `cuda` feature pulls cubecl-cuda 0.11.3 → cubecl-llvm, whose build dependency
# tracel-llvm-bundler downloads an LLVM 23 bundle from GitHub into
# $XDG_DATA_HOME/tracel/tracel-llvm-23.1.0-4 unless that directory holds the marker file
# `.tracel-llvm-installed` (XDG_DATA_HOME as the `dirs` crate reads it: absolute, else
# ~/.local/share). Our machines build offline and Debian has no LLVM 23, so that directory
# becomes a stand-in for Debian's LLVM 22: the marker, and a bin/llvm-config that forwards to
# Debian's. Only llvm-config is ever run from there; the bundler (src/llvm_sys.rs, config.rs)
# calls it as `llvm-config --link-static ARG` with ARG = --libdir, --includedir, --libs,
# --system-libs (link()) and --cxxflags (cubecl-llvm's C++ shims), and has --version, --cflags,
# --libnames helpers; all of them are forwarded unchanged except --system-libs (see the
# wrapper). llvm-sys itself is built with `no-llvm-linking` and never looks for LLVM.
# llvm-sys 231 carries LLVM 23 bindings linked against LLVM 22 here: it links; whether the
# LLVM→PTX kernel path works at run time is checked on a GPU (README, "GPU").
prepare_llvm_stand_in() {
  local data="${XDG_DATA_HOME:-}"
  [[ "$data" == /* ]] || data="$HOME/.local/share"
  local dir="$data/tracel/tracel-llvm-23.1.0-4" real=/usr/lib/llvm-22/bin/llvm-config
  [[ -x "$real" ]] || { echo "setup: $real is missing (package llvm-22-dev)" >&2; exit 2; }
  if [[ -e "$dir/.tracel-llvm-installed" && -e "$dir/bin/llvm-config" ]] \
     && ! grep -q 'kiln stand-in' "$dir/bin/llvm-config"; then
    echo "setup: $dir holds a real LLVM bundle; leaving it as it is"
    return
  fi
  mkdir -p "$dir/bin"
  cat >"$dir/bin/llvm-config.tmp" <<'WRAPPER'
#!/bin/sh
# kiln stand-in (written by scripts/setup.sh --cuda): tracel-llvm-bundler runs this instead of
# its downloaded LLVM's llvm-config; it forwards to Debian's LLVM 22.
real=/usr/lib/llvm-22/bin/llvm-config
case " $* " in
  *" --system-libs "*)
    # Debian's llvm-config prints some system libraries as absolute paths
    # (/usr/lib/x86_64-linux-gnu/libz3.so). The bundler's norm_lib turns a path into its file
    # stem, `libz3`, and emits `rustc-link-lib=dylib=libz3`, i.e. `-llibz3`, which fails to
    # link: print `-lz3` instead. Other words (-lrt, -lzstd, ...) pass through.
    out=$("$real" "$@") || exit $?
    words=""
    for w in $out; do
      case "$w" in
        /*/lib*.so | /*/lib*.so.* | /*/lib*.a)
          name=${w##*/lib}; name=${name%%.so*}; name=${name%.a}; w="-l$name" ;;
      esac
      words="$words${words:+ }$w"
    done
    printf '%s\n' "$words"
    ;;
  *) exec "$real" "$@" ;;
esac
WRAPPER
  chmod +x "$dir/bin/llvm-config.tmp"
  # Replaced and marked only when changed: the bundler's build script reruns when the marker's
  # mtime changes, and with it everything that links LLVM.
  if cmp -s "$dir/bin/llvm-config.tmp" "$dir/bin/llvm-config"; then
    rm -f "$dir/bin/llvm-config.tmp"
  else
    mv -f "$dir/bin/llvm-config.tmp" "$dir/bin/llvm-config"
  fi
  [[ -e "$dir/.tracel-llvm-installed" ]] || : >"$dir/.tracel-llvm-installed"
  echo "setup: LLVM stand-in for the cuda build in $dir (forwards to $real)"
}

if (( cuda )); then
  prepare_llvm_stand_in
  echo "setup: ready for \`cargo build --release --features cuda\`"
  exit 0
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup first" >&2; exit 2; }
cargo build --release
