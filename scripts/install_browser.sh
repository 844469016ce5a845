#!/usr/bin/env bash
# Install the headless browser the chat page's tests drive (tests/serve/test_page.py):
# Debian's `chromium` and `chromium-driver`, with apt-get, when `chromium` or
# `chromedriver` is missing. Runs as root, or through sudo when it needs no password.
# When it cannot install (no apt-get, no root, no network) it says so and exits 0: the
# browser tests then skip, rather than failing the whole run on such a machine.
set -uo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

skip() {
    echo "install_browser: $1; the chat page's browser tests will be skipped" >&2
    echo "install_browser: to run them, install chromium and chromedriver (Debian: apt-get install chromium chromium-driver)" >&2
    exit 0
}

command -v apt-get >/dev/null 2>&1 || skip "no apt-get on this machine"
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    skip "installing packages needs root (or sudo without a password)"
fi

echo "install_browser: installing chromium and chromium-driver with apt-get"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq || skip "apt-get update failed"
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver \
    || skip "apt-get install chromium chromium-driver failed"
command -v chromedriver >/dev/null 2>&1 || skip "chromedriver is still not on PATH"
echo "install_browser: $(chromium --version 2>/dev/null || echo chromium) installed"
