.PHONY: setup demo test test-fast lint proto lock bench
PY := .venv/bin/python

setup:
	./scripts/setup

demo: setup
	.venv/bin/fedwarden compare --attacks none,gaussian --aggregators mean,trimmed_mean,median --out runs/demo

test: setup
	./scripts/system-deps
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration"

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

proto: setup
	$(PY) -m server.protogen

bench: setup
	$(PY) bench/aggregators.py --clients 50 --dim 1000000 --json runs/bench-aggregators.json

# Rebuild requirements.lock from the top-level pins in a scratch venv.
lock:
	./scripts/relock
