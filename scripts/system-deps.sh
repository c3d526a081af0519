#!/usr/bin/env bash
# Install the system tools the native build needs (C/C++ compiler, cmake, git; ccache to make rebuilds fast)
# when they are missing. Uses apt-get or brew when available and permitted; otherwise says what is missing.
set -euo pipefail

missing=()
command -v git >/dev/null || missing+=(git)
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null || missing+=(build-essential)
command -v ccache >/dev/null || missing+=(ccache)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "system-deps: installing ${missing[*]}"
if command -v apt-get >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  if $SUDO true 2>/dev/null; then
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null && exit 0
  fi
elif command -v brew >/dev/null; then
  brew install "${missing[@]/build-essential/}" && exit 0
fi
# ccache only speeds rebuilds up; everything else is required.
required=("${missing[@]/ccache/}")
if [ -n "${required[*]// /}" ]; then
  echo "error: missing ${required[*]} — install them with your package manager and rerun" >&2
  exit 1
fi
echo "system-deps: ccache unavailable; builds will not be cached at the compiler level"
