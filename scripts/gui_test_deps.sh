#!/usr/bin/env bash
# What napari's GUI tests need on Debian/Ubuntu: Xvfb, Mesa and the Qt xcb libraries (offscreen Qt
# crashes in vispy). Installs the missing ones when it can (root, or passwordless sudo, and apt-get);
# otherwise prints one line naming them and exits 1, so `make test` stops before pytest aborts.
# Used by `make test` and, through it, by .ci/run.
set -euo pipefail

pkgs=(xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0
      libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0
      libxcb-cursor0 libxcb-xkb1 libdbus-1-3 libfontconfig1)

if ! command -v dpkg >/dev/null 2>&1; then
  # Not Debian-like: only the X server can be checked; the libraries are the distribution's business.
  command -v Xvfb >/dev/null 2>&1 && exit 0
  echo "make test: the GUI tests need Xvfb, Mesa and the Qt xcb libraries: install them (Xvfb was not found)" >&2
  exit 1
fi
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  fi
  if [ "$SUDO" != "none" ]; then
    echo "make test: installing what the GUI tests need: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    exit 0
  fi
fi
echo "make test: the GUI tests need these packages, install them first: sudo apt-get install ${missing[*]}" >&2
exit 1
