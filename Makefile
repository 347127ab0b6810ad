# The two commands of the README: `make demo` and `make test`. Every target sets everything up first (cached).
VENV ?= .venv
SETUP_STAMP := $(VENV)/.hvdlm-setup
PYTEST_ARGS ?=

.PHONY: setup demo test docs bench clean

setup:
	@bash hvdlm/install/setup.sh

demo: setup
	$(VENV)/bin/hvdlm launch jobs/demo.toml --np 2

# pytest exits 5 when a selection (PYTEST_ARGS=-k ...) collects nothing: that is no failure of the suite.
test: setup
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests selected"; exit 0; fi; exit $$rc

# The documentation site (mkdocs.yml): strict, so a broken link, anchor or generated reference fails; into build/site.
# NO_MKDOCS_2_WARNING: Material's notice about MkDocs 2.0 on every build, which says nothing about this site.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict

bench: setup
	$(VENV)/bin/python bench/dp_scaling.py

clean:
	rm -rf $(VENV) runs .pytest_cache build/site
