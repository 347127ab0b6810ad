# The two commands of the README: `make demo` and `make test`. Both set everything up first (cached).
VENV ?= .venv
SETUP_STAMP := $(VENV)/.hvdlm-setup
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup:
	@bash hvdlm/install/setup.sh

demo: setup
	$(VENV)/bin/hvdlm launch jobs/demo.toml --np 2

# pytest exits 5 when a selection (PYTEST_ARGS=-k ...) collects nothing: that is no failure of the suite.
test: setup
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests selected"; exit 0; fi; exit $$rc

bench: setup
	$(VENV)/bin/python bench/dp_scaling.py

clean:
	rm -rf $(VENV) runs .pytest_cache
