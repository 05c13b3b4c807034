# Quickstart: `make run` (the daemon on a dev box) and `make test` (everything CI runs).
.PHONY: run test test-long bench setup clean

run:
	tools/setup.sh run
	tools/dev-run.sh

test:
	tools/test.sh

test-long:
	tools/setup.sh test
	.venv/bin/python -m pytest -q -m slow

bench:
	tools/setup.sh test
	.venv/bin/pip install -q -e '.[dev,bench]' > .venv/bench-install.log 2>&1
	.venv/bin/python -m bench.run_all

setup:
	tools/setup.sh test

clean:
	rm -rf .dev-box .dev-box.json .pytest_cache .mypy_cache .ruff_cache
