#!/usr/bin/env bash
# Runs Rill's whole test suite, first installing what the tests need when it
# is missing (Debian packages, Rust components). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, installed only when missing so reruns are
# quick: mosquitto is the upstream broker the MQTT bridge's tests run
# against; kcat is a Kafka client the Kafka listener's tests run; make, g++,
# pkg-config and zlib1g-dev build librdkafka from source (rdkafka-sys runs
# its configure and make; C and C++ compilers; zlib through pkg-config);
# golang-go and golang-github-shopify-sarama-dev build a Go Kafka client
# (sarama, from Debian's sources: no Go module proxy needed).
debian_packages=(mosquitto kcat make g++ pkg-config zlib1g-dev golang-go golang-github-shopify-sarama-dev)
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

# kafka-python: a pure-Python Kafka client, so the Kafka listener is checked
# against a second implementation of the protocol besides librdkafka.
if ! python3 -c "import kafka" 2>/dev/null; then
  echo "test.sh: installing kafka-python"
  python3 -m pip install --quiet "kafka-python==3.0.12" \
    || python3 -m pip install --quiet --break-system-packages "kafka-python==3.0.12"
fi

# On a kernel with io_uring, the io_uring driver's suite must run, not fall back.
if [ -z "${RILL_REQUIRE_IO_URING:-}" ] && [ "$(uname -s)" = Linux ] && [ ! -e /.dockerenv ]; then
  if [ "$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" = 0 ]; then
    export RILL_REQUIRE_IO_URING=1
  fi
fi

# kafka-clients: the end-to-end tests with real Kafka clients (rdkafka, which
# builds librdkafka; kafka-python; kcat). Host only: the aarch64 cross gate
# cannot build librdkafka.
cargo test --workspace --locked --features rill-tests/kafka-clients "$@"
