#!/usr/bin/env bash
# Installs what mixq's build needs and is missing; does nothing (in well under a second) when all is there.
#  - libtorch: torch==2.13.0 (the version tch 0.26 pins) from the Python package registry, into a venv
#    outside the repo ($MIXQ_VENV, default ~/.cache/mixq/venv-torch-2.13.0). Skipped when LIBTORCH is set.
#  - cmake and libclang for building HiGHS (good_lp's `highs` feature), into the same venv, where the
#    system has none.
set -euo pipefail
. "$(dirname "$0")/env.sh"
TORCH_VERSION=2.13.0
say() { echo "[mixq setup] $*" >&2; }

need_venv=0
if [ -z "${LIBTORCH:-}" ]; then
  if ! grep -qs "__version__ = '$TORCH_VERSION" "$MIXQ_VENV"/lib/python3*/site-packages/torch/version.py; then
    need_venv=1
  fi
fi
has_cmake=0; command -v cmake >/dev/null 2>&1 && has_cmake=1
has_libclang=0
if [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH"/libclang*.so* >/dev/null 2>&1; then has_libclang=1; fi
if [ $has_libclang = 0 ] && ldconfig -p 2>/dev/null | grep -q 'libclang\.so\|libclang-[0-9.]*\.so'; then has_libclang=1; fi

if [ $need_venv = 0 ] && [ $has_cmake = 1 ] && [ $has_libclang = 1 ]; then exit 0; fi

if [ ! -x "$MIXQ_VENV/bin/python" ]; then
  say "creating the venv $MIXQ_VENV"
  mkdir -p "$(dirname "$MIXQ_VENV")"
  python3 -m venv "$MIXQ_VENV"
fi
pkgs=()
[ $need_venv = 1 ] && pkgs+=("torch==$TORCH_VERSION")
[ $has_cmake = 0 ] && pkgs+=(cmake)
[ $has_libclang = 0 ] && pkgs+=(libclang)
say "installing ${pkgs[*]} into $MIXQ_VENV (torch is ~4.7 GB and takes a few minutes the first time)"
"$MIXQ_VENV/bin/pip" install --disable-pip-version-check -q "${pkgs[@]}"
say "done"
