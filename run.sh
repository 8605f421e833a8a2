#!/usr/bin/env bash
# Set up the virtual environment on first use, then train or test.
#   ./run.sh train [--config FILE] [section.field=value ...]
#   ./run.sh test [pytest arguments ...]
set -euo pipefail
cd "$(dirname "$0")"

VENV="${MOR_JAX_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating virtual environment in $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    local want
    want="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
        echo "installing pinned requirements into $VENV" >&2
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -r requirements.txt
        "$VENV/bin/python" -m pip install --quiet --no-deps -e .
        echo "$want" > "$STAMP"
    fi
}

command="${1:-}"
shift || true
case "$command" in
    train)
        setup
        has_config=0
        for arg in "$@"; do
            case "$arg" in --config|--config=*) has_config=1 ;; esac
        done
        if [ "$has_config" = 0 ]; then
            set -- --config configs/default.yaml "$@"
        fi
        exec "$VENV/bin/python" train.py "$@"
        ;;
    eval)
        setup
        exec "$VENV/bin/python" eval.py "$@"
        ;;
    test)
        setup
        # Two workers (MOR_JAX_TEST_WORKERS); each test file stays on one worker, so module fixtures and compiled
        # functions are shared by the tests of a file.
        exec "$VENV/bin/python" -m pytest -q -n "${MOR_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
        ;;
    *)
        echo "usage: ./run.sh train [--config FILE] [key=value ...] | eval --run_dir DIR | test [pytest args]" >&2
        exit 2
        ;;
esac
