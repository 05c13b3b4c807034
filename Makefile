# Quickstart: `make run` (the daemon on a dev box) and `make test` (everything CI runs).
.PHONY: run test test-long test-system bench setup clean deb deb-lock models-large

run:
	tools/setup.sh run
	tools/dev-run.sh

test:
	tools/test.sh

test-long:
	tools/setup.sh test
	.venv/bin/python -m pytest -q -m slow

# Build the Debian package, install it into a clean Debian root (debootstrap, cached
# in /var/cache/edge-agent-test), provision, upgrade, remove and purge it; lintian.
# Then boot a root with systemd as PID 1 (systemd-nspawn -b), install the package and
# check the unit under the real systemd (READY, credentials, sandbox, watchdog, stop).
test-system:
	tools/setup.sh system
	.venv/bin/python -m pytest -q -m system tests/system

# build/edge-agent_<version>_amd64.deb, then lintian (packaging/README.md).  DEB_VERSION=
# overrides the version (default: pyproject.toml), DEB_OUT= the output folder (default:
# build), DEB_LINT=0 skips lintian.
deb:
	tools/setup.sh deb
	DEB_VERSION=$(DEB_VERSION) DEB_OUT=$(DEB_OUT) DEB_LINT=$(DEB_LINT) packaging/build-deb.sh

# Re-pin packaging/requirements.lock to the runtime versions installed in .venv.
deb-lock:
	tools/setup.sh test
	.venv/bin/python tools/debpkg.py lock packaging/requirements.lock

bench:
	tools/setup.sh test
	.venv/bin/pip install -q -e '.[dev,bench]' > .venv/bench-install.log 2>&1
	.venv/bin/python -m bench.run_all

# Dev-only: train models/available/cxr-lesion-512/1.0.0/model.onnx (28 MB, not in git;
# needs torch, the [train] extra; offline: PIP_FIND_LINKS=<wheel folder>). Minutes of CPU.
models-large:
	tools/setup.sh test
	.venv/bin/pip install -q -e '.[train]'
	.venv/bin/python -m training.build_large

setup:
	tools/setup.sh test

clean:
	rm -rf .dev-box .dev-box.json .pytest_cache .mypy_cache .ruff_cache build
