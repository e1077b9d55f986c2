.PHONY: setup demo test test-fast lint proto lock bench reliability
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
	$(PY) -m fedwarden.protocol.protogen

bench: setup
	$(PY) bench/aggregators.py --clients 50 --dim 1000000 --json runs/bench-aggregators.json

# Rebuild requirements.lock from the top-level pins in a scratch venv.
lock:
	./scripts/relock

# The heavy variants of the reliability tests (RELIABILITY.md): 200 agents, random crashes,
# 50 000 fuzz runs per parser, 2000 hypothesis examples. About 20 minutes on 2 cores.
reliability: setup
	FEDWARDEN_HEAVY=1 $(PY) -m pytest -q -s tests/test_load.py tests/test_faults.py tests/test_hostile.py tests/test_agent_data.py
