"""The documentation: the site builds strictly, says everything the code has, names only files that exist, and its
tutorials' commands run as written.

- The site (mkdocs.yml, docs/) builds with --strict once for the module: a broken link or anchor, a page left out
  of the navigation or a generator that fails ends the build. Every command and option of `hvdlm` (click's tree
  from hvdlm.cli:main) and every configuration key (as `section.key`, from hvdlm/config.py's dataclasses) is in the
  built HTML.
- The ranges the configuration reference states where the validation has no table (docs/hooks.py's
  SPECIAL_RANGES) are tried against the validation itself.
- README.md stays short and keeps both commands; every repository path that README.md or a page names exists.
- Each tutorial's command blocks (```sh, except those titled "On the cluster") run in order in one bash in a
  scratch directory that sees the repository's jobs/ and docs/, with `hvdlm` the real CLI and tiny settings: a
  launch or train runs train.max_steps=4 (8 where the page names its own max_steps, a longer continuation), with
  short evaluations and samples. So a renamed option or key fails here before it fails a reader.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import REPO, run_process

from hvdlm import config as hvdlm_config
from hvdlm.cli import main

DOCS = REPO / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
PAGES = sorted(DOCS.rglob("*.md"))


def load_hooks():
    """docs/hooks.py, the generators of the site's references, as a module."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


# ------------------------------------------------------------------------------------------------------------
# The site
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built strictly into a folder of the test's own."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = run_process([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], env=env)
    assert r.code == 0, f"mkdocs build --strict failed (`make docs` shows the same):\n{r.out[-4000:]}"
    return out


def page_text(site: Path, page: str) -> str:
    """The text of a built page (its tags dropped, entities decoded)."""
    raw = (site / page / "index.html").read_text()
    return html.unescape(re.sub(r"<[^>]+>", " ", raw))


def commands(group: click.Command, path: str = "hvdlm"):
    """(`hvdlm data prepare`, its click command) for every command of the tree."""
    yield path, group
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from commands(command, f"{path} {name}")


def test_the_site_builds_strictly(site):
    for page in ("index.html", "reference/cli/index.html", "reference/config/index.html", "benchmarks/index.html"):
        assert (site / page).is_file(), page


def test_every_command_and_option_is_in_the_command_reference(site):
    text = page_text(site, "reference/cli")
    missing = []
    for path, command in commands(main):
        if path not in text:
            missing.append(path)
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                missing += [f"{path} {opt}" for opt in param.opts + param.secondary_opts if opt not in text]
    assert not missing, f"not in the built reference/cli page: {missing}"


def config_keys() -> list[str]:
    import dataclasses

    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(hvdlm_config.JobConfig)
        for f in dataclasses.fields(section.default_factory())
    ]


def test_every_config_key_is_in_the_configuration_reference(site):
    text = page_text(site, "reference/config")
    missing = [key for key in config_keys() if key not in text]
    assert not missing, f"not in the built reference/config page: {missing}"
    assert len(config_keys()) > 80  # the walk saw the sections


def test_every_generator_writes_rows():
    # A generator that finds nothing (a docstring's block reformatted, a table renamed) would still build.
    for name, generate in hooks.GENERATORS.items():
        rows = [line for line in generate().splitlines() if line.startswith(("| ", "- "))]
        assert len(rows) >= 5, f"docs/hooks.py's {name} wrote {len(rows)} rows"


@pytest.mark.parametrize("key", sorted(hooks.SPECIAL_RANGES))
def test_stated_ranges_are_the_validations(key):
    _, accepted, refused = hooks.SPECIAL_RANGES[key]
    for overrides in accepted:
        hvdlm_config.load_config(None, overrides)
    for overrides in refused:
        with pytest.raises(hvdlm_config.InputError):
            hvdlm_config.load_config(None, overrides)


def test_benchmark_rows_have_every_field_and_recording_appends_them(tmp_path, monkeypatch):
    rows = [json.loads(line) for line in (REPO / "bench" / "results.jsonl").read_text().splitlines() if line]
    assert rows and all(set(hooks.BENCH_FIELDS) <= set(row) for row in rows)
    assert all(row["what"] and row["figure"] and row["machine"] and row["date"] and row["command"] for row in rows)

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from recording import Figure, record

    results = tmp_path / "results.jsonl"
    results.write_text((REPO / "bench" / "results.jsonl").read_text())
    monkeypatch.setattr(sys, "argv", ["bench/dp_scaling.py", "--record"])
    newer = Figure("Data parallelism: hvdlm / PyTorch DDP (gloo) tokens/s, 2 ranks", "1.500", ">= 1.00")
    record("Data-parallel scaling", ["| a | b |"], figures=[newer], log=tmp_path / "log.md", results=results)
    assert "## Data-parallel scaling, " in (tmp_path / "log.md").read_text()
    shown = {row["what"]: row for row in hooks.current_figures(results)}
    assert shown[newer.what]["figure"] == "1.500"
    assert shown[newer.what]["command"] == "python bench/dp_scaling.py --record"
    assert len(shown) == len({row["what"] for row in rows})  # replaced in place, not added


# ------------------------------------------------------------------------------------------------------------
# README.md and the files the pages name
# ------------------------------------------------------------------------------------------------------------


def test_readme_is_short_and_keeps_its_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    assert "make demo" in readme and "make test" in readme


CODE = re.compile(r"```[^\n]*\n(.*?)```|`([^`\n]+)`", re.S)
# A path into the repository's fixed folders (the top level is fixed: see docs/architecture.md).
REPO_PATH = re.compile(r"(?<![\w./-])((?:jobs|hostfiles|bench|hvdlm|tests|docs)/[\w./*-]*)")
# Paths the pages name as what a command writes, not as files of the repository.
WRITTEN_BY_COMMANDS = ("bench/gpu-carry", "bench/gpu_wheels")  # filled by gpu_carry.sh, wheel_cache.py keep


def named_paths(text: str) -> set[str]:
    found = set()
    for block, inline in CODE.findall(text):
        for path in REPO_PATH.findall(block or inline):
            path = path.rstrip(".")
            if "*" not in path and not path.startswith(WRITTEN_BY_COMMANDS):
                found.add(path)
    return found


@pytest.mark.parametrize(
    "page", [REPO / "README.md", *PAGES, REPO / "mkdocs.yml"], ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_every_repository_path_a_page_names_exists(page):
    text = page.read_text()
    if page.suffix == ".yml":
        text = f"```\n{text}\n```"
    missing = sorted(p for p in named_paths(text) if not (REPO / p).exists())
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_path_finder_finds_paths():
    # The check above passes on an empty answer: it must see a path in a command, and skip outputs and globs.
    text = "```sh\nhvdlm plan jobs/big.toml --write-job planned.toml\n```\nand `docs/**/*.md`, `bench/gpu-carry/x`"
    assert named_paths(text) == {"jobs/big.toml"}


# ------------------------------------------------------------------------------------------------------------
# The tutorials
# ------------------------------------------------------------------------------------------------------------

BLOCK = re.compile(r"^```sh(?P<attrs>[^\n]*)\n(?P<body>.*?)^```", re.M | re.S)

# `hvdlm` in a tutorial: the real CLI, with a launch or train cut to a few steps, short evaluations and samples.
TINY_HVDLM = r"""
hvdlm() {
    if [ "$1" != launch ] && [ "$1" != train ]; then "$PYTHON" -m hvdlm "$@"; return; fi
    local args=() steps=4 a
    for a in "$@"; do
        case "$a" in train.max_steps=*) steps=8 a=train.max_steps=8 ;; esac
        args+=("$a")
    done
    "$PYTHON" -m hvdlm "${args[@]}" --set train.max_steps=$steps --set train.eval_interval=4 \
        --set train.eval_batches=2 --set train.sample_tokens=16 --set train.log_interval=1
}
"""


def runnable_blocks(page: Path) -> list[str]:
    return [m["body"] for m in BLOCK.finditer(page.read_text()) if "on the cluster" not in m["attrs"].lower()]


def test_the_block_finder_skips_cluster_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('```sh\nhvdlm runs\n```\n\n```sh title="On the cluster"\nsbatch x\n```\n```toml\nx = 1\n```\n')
    assert runnable_blocks(page) == ["hvdlm runs\n"]


def run_tutorial(page: Path, workdir: Path, cache: Path):
    """The page's tested blocks in one bash, in `workdir`, which sees the repository's jobs/ and docs/."""
    for name in ("jobs", "docs"):
        (workdir / name).symlink_to(REPO / name)
    script = "set -euo pipefail\n" + TINY_HVDLM + "\n".join(runnable_blocks(page))
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HVDLM_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.run(["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{page.name}: a command failed (exit {proc.returncode}).\n--- script ---\n{script}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.mark.distributed
@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.stem)
def test_a_tutorials_commands_run_as_written(page, tmp_path, cache_dir):
    blocks = runnable_blocks(page)
    assert blocks, f"{page.name} has no tested command block"
    for block in blocks:  # every hvdlm command of the page parses as a shell command line
        shlex.split(block, comments=True)
    run_tutorial(page, tmp_path, cache_dir)
    for run in (tmp_path / "runs").glob("*") if (tmp_path / "runs").is_dir() else ():
        check_run_is_described(run)


def check_run_is_described(run: Path) -> None:
    """Every file of a run directory, every field of its metrics rows and summary, is in the reference page."""
    reference = hooks.expand((DOCS / "reference" / "files.md").read_text())
    names = [p.name + ("/" if p.is_dir() else "") for p in run.iterdir()]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fields = {key for row in rows for key in row} | set(json.loads((run / "summary.json").read_text()))
    missing = [n for n in names if f"`{n}`" not in reference]
    missing += [f for f in sorted(fields) if f"`{f}`" not in reference]
    assert not missing, f"docs/reference/files.md does not describe {missing} of {run}"
