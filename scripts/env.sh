#!/usr/bin/env bash
# Sourced by the Makefile recipes (through scripts/with-env): points cargo at libtorch and at the
# HiGHS build tools. Installs nothing; scripts/setup.sh does that.
MIXQ_HOME="${MIXQ_HOME:-$HOME/.cache/mixq}"
MIXQ_VENV="${MIXQ_VENV:-$MIXQ_HOME/venv-torch-2.13.0}"
export MIXQ_HOME MIXQ_VENV
if [ -z "${LIBTORCH:-}" ]; then
  # torch-sys runs `python` when VIRTUAL_ENV is set: the venv's python, which has torch 2.13.0.
  export VIRTUAL_ENV="$MIXQ_VENV"
  export LIBTORCH_USE_PYTORCH=1
fi
if [ -d "$MIXQ_VENV/bin" ]; then
  export PATH="$MIXQ_VENV/bin:$PATH"
fi
if [ -z "${LIBCLANG_PATH:-}" ]; then
  for d in "$MIXQ_VENV"/lib/python3*/site-packages/clang/native; do
    if [ -d "$d" ]; then export LIBCLANG_PATH="$d"; fi
  done
fi
true
