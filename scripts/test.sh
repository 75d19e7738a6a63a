#!/usr/bin/env bash
# Runs Rill's whole test suite, first installing what the tests need when it
# is missing (Debian packages, Rust components). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: peers the suites run against (mosquitto
# for the MQTT bridge). Installed only when missing, so reruns are quick.
debian_packages=(mosquitto)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

# On a kernel with io_uring, the io_uring driver's suite must run, not fall back.
if [ -z "${RILL_REQUIRE_IO_URING:-}" ] && [ "$(uname -s)" = Linux ] && [ ! -e /.dockerenv ]; then
  if [ "$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" = 0 ]; then
    export RILL_REQUIRE_IO_URING=1
  fi
fi

cargo test --workspace --locked "$@"
