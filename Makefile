.PHONY: test run deb dashboards

test:
	./scripts/test.sh

run:
	./scripts/run-simulated.sh

deb:
	packaging/deb/build.sh dist

dashboards:
	.venv/bin/python dashboards/generate.py
