.PHONY: test run deb lintian man dashboards

test:
	./scripts/test.sh

run:
	./scripts/run-simulated.sh

deb:
	packaging/deb/build.sh dist

# builds the package and fails on any lintian error or warning (packaging/deb/lintian-overrides says why
# the few it overrides are right for a self-contained virtualenv in /opt)
lintian:
	deb=$$(packaging/deb/build.sh dist) && lintian --fail-on error,warning "$$deb"

# the manual page, generated from the argparse definitions: man -l dist/stoker.1
man:
	mkdir -p dist && .venv/bin/python -m stoker.manpage > dist/stoker.1

dashboards:
	.venv/bin/python dashboards/generate.py
