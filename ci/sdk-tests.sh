#!/usr/bin/env bash
# The official OpenAI and Anthropic Python SDKs against `dsv4 serve --model builtin:tiny`:
# server/tests/sdk/test_sdk.py. Needs python3 (with venv and pip) and PyPI; the SDKs are pinned and
# installed into a venv under the cargo target dir, which later runs reuse. Builds dsv4 the way
# `cargo test` does (a no-op right after `cargo test --workspace`), starts the server on a free
# loopback port, waits for /health (at most 120 s), runs the tests and stops the server. Exits
# non-zero if anything fails. Extra arguments go to pytest (e.g. `-k messages -x`);
# DSV4_SDK_SERVE_ARGS adds arguments to `dsv4 serve` (e.g. `--devices 2 --tensor-parallel 2`);
# DSV4_SDK_MODEL replaces its model (default builtin:tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONDONTWRITEBYTECODE=1

OPENAI_VERSION=3.57.0
ANTHROPIC_VERSION=2.14.0
PYTEST_VERSION=9.2.0
HEALTH_TIMEOUT_S=120

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
venv="$target_dir/sdk-venv"
pins=("openai==$OPENAI_VERSION" "anthropic==$ANTHROPIC_VERSION" "pytest==$PYTEST_VERSION")

if ! "$venv/bin/python" - "${pins[@]}" 2>/dev/null <<'EOF'; then
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
EOF
    echo "sdk-tests: creating $venv with ${pins[*]}"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --disable-pip-version-check --quiet --timeout 60 --retries 3 "${pins[@]}"
fi

echo "sdk-tests: building dsv4 (test profile, as cargo test --workspace builds it)"
cargo test -p dsv4-cli --no-run --quiet
bin="$target_dir/debug/dsv4"

log=$(mktemp "${TMPDIR:-/tmp}/dsv4-sdk-serve.XXXXXX")
api_key=test-key
# shellcheck disable=SC2086 # the extra arguments are words
"$bin" serve --model "${DSV4_SDK_MODEL:-builtin:tiny}" --backend cpu --host 127.0.0.1 --port 0 --api-key "$api_key" \
    ${DSV4_SDK_SERVE_ARGS:-} >"$log" 2>&1 &
server_pid=$!
stop_server() {
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    rm -f "$log"
}
trap stop_server EXIT

server_log() {
    echo "---- dsv4 serve log ----" >&2
    tail -n 50 "$log" >&2
    echo "------------------------" >&2
}

# The server prints `dsv4 serving `NAME` at http://127.0.0.1:PORT/v1 (...)` once it listens.
base_url=""
deadline=$((SECONDS + HEALTH_TIMEOUT_S))
while [ -z "$base_url" ]; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "sdk-tests: dsv4 serve exited before listening" >&2
        server_log
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "sdk-tests: dsv4 serve did not print its URL within ${HEALTH_TIMEOUT_S} s" >&2
        server_log
        exit 1
    fi
    base_url=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -n 1 || true)
    [ -n "$base_url" ] || sleep 0.5
done
if ! python3 - "$base_url/health" "$((deadline - SECONDS))" <<'EOF'; then
import sys, time, urllib.request
url, budget = sys.argv[1], max(1, int(sys.argv[2]))
end = time.monotonic() + budget
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > end:
        sys.exit(1)
    time.sleep(0.5)
EOF
    echo "sdk-tests: $base_url/health did not answer 200 within ${HEALTH_TIMEOUT_S} s" >&2
    server_log
    exit 1
fi
echo "sdk-tests: dsv4 serve ${DSV4_SDK_SERVE_ARGS:-} is up at $base_url"

status=0
DSV4_BASE_URL="$base_url" DSV4_API_KEY="$api_key" DSV4_BIN="$bin" DSV4_MODEL=builtin:tiny \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider server/tests/sdk/test_sdk.py "$@" || status=$?
if [ "$status" -ne 0 ]; then
    server_log
fi
exit "$status"
