#!/usr/bin/env bash
# Runs the suite offline; pytest's exit code 5 (no tests collected) is a failure here, not a pass.
set -u
PY="${1:-.venv/bin/python}"
shift || true  # the rest goes to pytest (e.g. `-m fast`)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# --durations: the slowest tests, to keep the suite under 15 minutes (README)
"$PY" -m pytest -q -p no:cacheprovider --durations=10 "$@" tests
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
