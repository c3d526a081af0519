#!/usr/bin/env bash
# Install the system tools the native build needs (C/C++ compiler, cmake, git; ccache to make rebuilds fast)
# when they are missing, plus those of a GPU backend:
#   scripts/system-deps.sh [cpu|vulkan|cuda|metal]      (Makefile: make install BACKEND=vulkan)
# Uses apt-get or brew when available and permitted; otherwise says what is missing.
set -euo pipefail

backend="${1:-cpu}"
case "$backend" in
  cpu|vulkan|cuda|metal) ;;
  *) echo "error: unknown backend '$backend' (cpu, vulkan, cuda or metal)" >&2; exit 2 ;;
esac

missing=()
command -v git >/dev/null || missing+=(git)
command -v cmake >/dev/null || missing+=(cmake)
command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null || missing+=(build-essential)
command -v ccache >/dev/null || missing+=(ccache)

# Vulkan (Debian/Ubuntu names): headers + loader, the shader compiler, SPIR-V headers, Mesa's drivers (lavapipe runs
# on any CPU). A LunarG SDK (VULKAN_SDK) provides the first three elsewhere.
vulkan_missing=()
if [ "$backend" = vulkan ]; then
  # SYSTEM_DEPS_INCLUDE_DIRS / SYSTEM_DEPS_ICD_DIRS (colon-separated) replace where to look (tests use them).
  IFS=: read -r -a inc <<< "${SYSTEM_DEPS_INCLUDE_DIRS:-/usr/include:/usr/local/include}"
  [ -n "${VULKAN_SDK:-}" ] && inc+=("$VULKAN_SDK/include")
  IFS=: read -r -a icd <<< "${SYSTEM_DEPS_ICD_DIRS:-/usr/share/vulkan/icd.d:/etc/vulkan/icd.d}"
  has() { for d in "${inc[@]}"; do [ -e "$d/$1" ] && return 0; done; return 1; }
  has_icd() { for d in "${icd[@]}"; do ls "$d"/*.json >/dev/null 2>&1 && return 0; done; return 1; }
  has vulkan/vulkan.hpp || vulkan_missing+=(libvulkan-dev)
  command -v glslc >/dev/null || [ -x "${VULKAN_SDK:-/nonexistent}/bin/glslc" ] || vulkan_missing+=(glslc)
  has spirv || vulkan_missing+=(spirv-headers)
  has_icd || vulkan_missing+=(mesa-vulkan-drivers)
fi
cuda_missing=""
if [ "$backend" = cuda ] && ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ]; then
  # Not installable from here: the toolkit matching the machine's driver comes from NVIDIA (or nvidia-cuda-toolkit).
  cuda_missing="nvcc (the CUDA toolkit: NVIDIA's packages, or apt-get install nvidia-cuda-toolkit; or set CUDACXX)"
fi
if [ "$backend" = metal ] && [ "$(uname -s)" != Darwin ]; then
  echo "error: the metal backend needs macOS" >&2
  exit 1
fi

all=(${missing[@]+"${missing[@]}"} ${vulkan_missing[@]+"${vulkan_missing[@]}"})
if [ ${#all[@]} -gt 0 ]; then
  echo "system-deps: installing ${all[*]}"
  if command -v apt-get >/dev/null; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    if $SUDO true 2>/dev/null; then
      $SUDO apt-get update -qq >/dev/null
      if DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${all[@]}" >/dev/null; then
        missing=(); vulkan_missing=()
      fi
    fi
  elif command -v brew >/dev/null && [ ${#missing[@]} -gt 0 ]; then
    brew install "${missing[@]/build-essential/}" && missing=()
  fi
fi
if [ ${#vulkan_missing[@]} -gt 0 ]; then
  echo "error: --backend vulkan needs ${vulkan_missing[*]} (Debian/Ubuntu packages), which could not be installed" \
       "here — install them (apt-get install ${vulkan_missing[*]}) or the LunarG Vulkan SDK, and rerun" >&2
  exit 1
fi
if [ -n "$cuda_missing" ]; then
  echo "error: --backend cuda needs $cuda_missing" >&2
  exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0
# ccache only speeds rebuilds up; everything else is required.
required=("${missing[@]/ccache/}")
if [ -n "${required[*]// /}" ]; then
  echo "error: missing ${required[*]} — install them with your package manager and rerun" >&2
  exit 1
fi
echo "system-deps: ccache unavailable; builds will not be cached at the compiler level"
