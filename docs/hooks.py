"""MkDocs hooks: the references generated from the code at every build, so that they cannot drift from it.

A page asks for a generated part with a line of its own, `<!-- generated: NAME -->`; NAME is one of GENERATORS:

- config-keys: every key of the job file as `section.key`, with its type, default, allowed values and the comment
  that hvdlm/config.py gives its field (the validation's tables give the ranges);
- exit-codes: the exit codes of hvdlm/runfiles.py and hvdlm/errors.py, with the comments that explain them;
- run-directory: the files of a run directory, from hvdlm/runfiles.py's docstring;
- checkpoint-file: what a checkpoint file holds and how its files are named (hvdlm/checkpoint/format.py, store.py);
- layers: the packages top to bottom (tests/test_house.py's LAYERS), each with the first line of its docstring;
- gpu-table: the planner's GPU table (hvdlm/plan/gpus.py);
- package-modules: each package's modules, as the package's docstring lists them;
- optimizer-interface: the optimizer contract of hvdlm/optim/interface.py, the calls of a step in order;
- benchmarks: the current figures, the newest row of each in bench/results.jsonl.

The command line's reference is mkdocs-click's (`::: mkdocs-click` in reference/cli.md). The build imports the
hvdlm of this checkout (the repository root goes first on sys.path), whatever else is installed.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import sys
import tokenize
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.M)


def on_config(config, **kwargs):
    if str(REPO) not in sys.path[:1]:
        sys.path.insert(0, str(REPO))
    return config


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    return expand(markdown, page.file.src_path)


def on_page_content(html: str, page, config, files, **kwargs) -> str:
    """The command reference: mkdocs-click lists each group's commands with the first line of their docstrings,
    which may stop mid-sentence; the list gets click's own one-line summary (what `hvdlm --help` shows, longer)."""
    if page.file.src_path != "reference/cli.md":
        return html
    return SUBCOMMAND_ITEM.sub(whole_summary, html)


# mkdocs-click's list item of a command: <li><em><a href="#hvdlm-data-prepare">prepare</a></em>: TEXT</li>
SUBCOMMAND_ITEM = re.compile(r'(<li><em><a href="#(?P<anchor>hvdlm[\w-]*)">[\w-]+</a></em>: )(?P<text>.*?)(</li>)')


def whole_summary(match: re.Match) -> str:
    import html

    import click

    from hvdlm.cli import main

    command: click.Command = main
    for name in match["anchor"].split("-")[1:]:
        command = command.commands[name]  # type: ignore[attr-defined]
    summary = html.escape(command.get_short_help_str(limit=200))
    summary = re.sub(r"`([^`]+)`", r"<code>\1</code>", summary)
    return f"{match.group(1)}{summary}{match.group(4)}"


def expand(markdown: str, where: str = "a page") -> str:
    """The page with each `<!-- generated: NAME -->` line replaced by what GENERATORS[NAME] writes."""

    def generated(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"{where}: no generator named '{name}' (docs/hooks.py: {sorted(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(generated, markdown)


# ------------------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------------------


def cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def trailing_comments(path: Path) -> dict[int, str]:
    """The comment at the end of each line of a Python file, by line number."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
    return found


def comment_above(lines: list[str], lineno: int) -> str:
    """The block of full-line comments right above line `lineno` (1-based), joined."""
    block = []
    i = lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        block.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(block)


def docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def indented_entries(text: str) -> list[tuple[str, str]]:
    """The `    name    what it is` block of a docstring: (name, text), continuation lines joined. The descriptions
    start in one column, the first entry's (a name may be followed by a single space, or by nothing)."""
    block = [line for line in text.splitlines() if line.startswith("    ")]
    first = next((re.match(r"^ {4}\S.*?\s{2,}", line) for line in block if re.match(r"^ {4}\S.*?\s{2,}", line)), None)
    if first is None:
        return []
    column = first.end()
    entries: list[tuple[str, str]] = []
    for line in block:
        if line[4] != " ":
            entries.append((line[4:column].strip(), line[column:].strip()))
        elif entries:
            name, what = entries[-1]
            entries[-1] = (name, f"{what} {line.strip()}".strip())
    return entries


def paragraphs_outside_blocks(text: str) -> list[str]:
    """A docstring's prose paragraphs (its indented blocks left out), each joined into one line."""
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        if not line.strip() or line.startswith("    "):
            if current:
                paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    return paragraphs


# ------------------------------------------------------------------------------------------------------------
# Configuration keys
# ------------------------------------------------------------------------------------------------------------

# Ranges that hvdlm/config.py checks in code of their own rather than in its tables: what the page says, and values
# the validation must accept and refuse for it to be true (tests/test_docs.py tries them, so a change there fails the
# suite until this says the same). Each probe is a list of `--set` overrides.
SPECIAL_RANGES: dict[str, tuple[str, list[list[str]], list[list[str]]]] = {
    "data.val_fraction": (
        "between 0 and 1 (both excluded)",
        [["data.val_fraction=0.5"]],
        [["data.val_fraction=0"], ["data.val_fraction=1"]],
    ),
    "train.watchdog_s": (
        "seconds >= 0 (0: off), or -1",
        [["train.watchdog_s=0"], ["train.watchdog_s=-1"], ["train.watchdog_s=30"]],
        [["train.watchdog_s=-2"], ["train.watchdog_s=-0.5"]],
    ),
    "train.zero": ("0, 1, 2 or 3", [["train.zero=0"], ["train.zero=3"]], [["train.zero=4"], ["train.zero=-1"]]),
    "train.min_lr": (
        ">= 0, at most train.lr",
        [["train.min_lr=0", "train.lr=1e-3"], ["train.min_lr=1e-3", "train.lr=1e-3"]],
        [["train.min_lr=2e-3", "train.lr=1e-3"], ["train.min_lr=-1e-5"]],
    ),
    "model.vocab_size": (
        "256 to 4,194,304",
        [["model.vocab_size=256"], ["model.vocab_size=4194304"]],
        [["model.vocab_size=255"], ["model.vocab_size=4194305"]],
    ),
    "data.vocab_size": (
        "258 to 1,048,576 with tokenizer bpe",
        [["data.tokenizer=bpe", "data.vocab_size=258"], ["data.tokenizer=bpe", "data.vocab_size=1048576"]],
        [["data.tokenizer=bpe", "data.vocab_size=257"], ["data.tokenizer=bpe", "data.vocab_size=1048577"]],
    ),
}


def type_name(hint) -> str:
    """`int`, `float`, `str`, `bool`, `list of str`, `str or list of int`, `str` for a choice of words."""
    if typing.get_origin(hint) is typing.Literal:
        return type(typing.get_args(hint)[0]).__name__
    if typing.get_origin(hint) is list:
        return f"list of {typing.get_args(hint)[0].__name__}"
    args = typing.get_args(hint)
    if args:
        return " or ".join(type_name(a) for a in args)
    return hint.__name__


def toml_value(value) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def allowed(key: str, hint, config) -> str:
    """The values a key allows: its words, or the range the validation checks."""
    if key in SPECIAL_RANGES:
        return SPECIAL_RANGES[key][0]
    if typing.get_origin(hint) is typing.Literal:
        return ", ".join(f"`{w}`" for w in typing.get_args(hint))
    if hint is bool:
        return "`true`, `false`"
    low = ""
    if key in config.UNIT_INTERVAL:
        return "0 to 1 (1 excluded)"
    if key in config.POSITIVE:
        low = "> 0" if type_name(hint) == "float" else "1"
    elif key in config.NON_NEGATIVE:
        low = "0"
    high = config._MAXIMA.get(key, config.FLOAT_MAXIMA.get(key))
    if high is not None:
        return f"{low or 'up'} to {high:,.0f}"
    if low == "> 0":
        return "> 0"
    return f">= {low}" if low else ""


def config_keys() -> str:
    from hvdlm import config

    comments = trailing_comments(REPO / "hvdlm" / "config.py")
    tree = ast.parse((REPO / "hvdlm" / "config.py").read_text())
    field_lines = {
        (node.name, item.target.id): item.end_lineno
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        for item in node.body
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }
    out = []
    defaults = config.JobConfig()
    for section in dataclasses.fields(config.JobConfig):
        cls = type(getattr(defaults, section.name))
        hints = typing.get_type_hints(cls)
        out += [
            f"## `[{section.name}]` {{#{section.name}}}",
            "",
            "| key | type | default | allowed | what it does |",
            "|---|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            comment = comments.get(field_lines[(cls.__name__, f.name)], "")
            default = toml_value(getattr(getattr(defaults, section.name), f.name))
            row = [
                f"`{key}`",
                type_name(hints[f.name]),
                f"`{default}`",
                allowed(key, hints[f.name], config),
                comment,
            ]
            out.append("| " + " | ".join(cell(c) for c in row) + " |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------
# Exit codes, the run directory, the checkpoint file
# ------------------------------------------------------------------------------------------------------------


def exit_codes() -> str:
    from hvdlm.errors import InputError

    path = REPO / "hvdlm" / "runfiles.py"
    lines = path.read_text().splitlines()
    trailing = trailing_comments(path)
    rows = [
        ("0", "", "The run finished (or, with `--resume auto`, was already finished); the command did what it said."),
        (
            str(InputError.exit_code),
            "`InputError.exit_code`",
            " ".join(docstring(REPO / "hvdlm" / "errors.py").split("\n\n")[:2]),
        ),
    ]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "").endswith("_EXIT_CODE"):
            name = node.targets[0].id
            why = " ".join(filter(None, [comment_above(lines, node.lineno), trailing.get(node.lineno, "")]))
            rows.append((str(ast.literal_eval(node.value)), f"`{name}`", why))
    rows.append(("128 + N", "", "A rank stopped by signal N after its checkpoint (130 for Ctrl-C, SIGINT)."))
    out = ["| code | name in the code | meaning |", "|---|---|---|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def code_names(names: str) -> str:
    """`a`, `b` for "a, b"."""
    return ", ".join(f"`{n.strip()}`" for n in names.split(","))


def run_directory() -> str:
    entries = indented_entries(docstring(REPO / "hvdlm" / "runfiles.py"))
    out = ["| file | what it holds |", "|---|---|"]
    out += [f"| `{name}` | {cell(what)} |" for name, what in entries]
    return "\n".join(out)


def checkpoint_file() -> str:
    fmt = docstring(REPO / "hvdlm" / "checkpoint" / "format.py")
    store = docstring(REPO / "hvdlm" / "checkpoint" / "store.py")
    naming, *after = paragraphs_outside_blocks(fmt)[1:]
    table = ["| key | what it holds |", "|---|---|"]
    table += [f"| {code_names(name)} | {cell(what)} |" for name, what in indented_entries(fmt)]
    # store.py's naming and completeness paragraphs (its last one is about its imports).
    return "\n\n".join([naming, "\n".join(table), *after, *paragraphs_outside_blocks(store)[1:3]])


# ------------------------------------------------------------------------------------------------------------
# The layers of the package, the benchmarks
# ------------------------------------------------------------------------------------------------------------


def house_layers() -> list[list[str]]:
    """tests/test_house.py's LAYERS, read without importing the tests."""
    tree = ast.parse((REPO / "tests" / "test_house.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "LAYERS":
            return ast.literal_eval(node.value)
    raise LookupError("tests/test_house.py has no LAYERS")


def module_path(name: str) -> Path:
    parts = name.split(".")
    package = REPO.joinpath(*parts) / "__init__.py"
    return package if package.is_file() else REPO.joinpath(*parts).with_suffix(".py")


def package_modules() -> str:
    """Each package's modules, as its docstring lists them (tests/test_house.py checks that the list is whole)."""
    out = []
    for members in house_layers():
        for name in members:
            path = module_path(name)
            if path.name != "__init__.py":
                continue
            shown = path.parent.relative_to(REPO).as_posix()
            out += [f"**`{shown}/`**: {docstring(path).split(chr(10) * 2)[0].replace(chr(10), ' ')}", ""]
            entries = re.findall(r"^- ([\w, ]+): (.*(?:\n  .*)*)", docstring(path), re.M)
            out += [f"- {code_names(names)}: {' '.join(what.split())}" for names, what in entries]
            out.append("")
    return "\n".join(out)


def optimizer_interface() -> str:
    """hvdlm/optim/interface.py: the calls of a step in order, then each method's docstring."""
    path = REPO / "hvdlm" / "optim" / "interface.py"
    text = docstring(path)
    out = ["| in a step, in order | what it does |", "|---|---|"]
    out += [f"| `{name}` | {cell(what)} |" for name, what in indented_entries(text)]
    after = paragraphs_outside_blocks(text)[-1]
    out += ["", after[:1].upper() + after[1:], "", "| method | contract |", "|---|---|"]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingOptimizer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and ast.get_docstring(item):
                    abstract = any("abstractmethod" in ast.unparse(d) for d in item.decorator_list)
                    name = f"`{item.name}`" + (" (every kind)" if abstract else "")
                    out.append(f"| {name} | {cell(' '.join(ast.get_docstring(item).split()))} |")
    return "\n".join(out)


def layers() -> str:
    out = ["| package or module | layer | what it owns |", "|---|---|---|"]
    for i, members in enumerate(house_layers(), start=1):
        for name in members:
            path = module_path(name)
            first = docstring(path).split("\n\n")[0].replace("\n", " ")
            shown = path.relative_to(REPO).as_posix().removesuffix("/__init__.py")
            out.append(f"| `{shown}` | {i} | {cell(first)} |")
    return "\n".join(out)


def gpu_table() -> str:
    from hvdlm.plan.gpus import GPUS

    out = [
        "| `--gpu` | TFLOP/s | GB | in a node (NVLink) | between nodes | achievable fraction |",
        "|---|---|---|---|---|---|",
    ]
    for g in GPUS.values():
        out.append(
            f"| `{g.name}` | {g.peak_tflops:g} | {g.memory_gb:g} | {g.intra_node_gbps:g} Gbit/s "
            f"({g.intra_node_gbps / 8:g} GB/s) | {g.inter_node_gbps:g} Gbit/s | {g.efficiency:g} |"
        )
    return "\n".join(out)


BENCH_RESULTS = REPO / "bench" / "results.jsonl"
BENCH_FIELDS = ("what", "figure", "target", "machine", "date", "command")


def current_figures(path: Path = BENCH_RESULTS) -> list[dict]:
    """The newest row of each `what`, in the order the figures first appear in the file."""
    newest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            newest[row["what"]] = row  # a dict keeps the place of a key's first insertion
    return list(newest.values())


def benchmarks() -> str:
    out = ["| " + " | ".join(BENCH_FIELDS) + " |", "|" + "---|" * len(BENCH_FIELDS)]
    for row in current_figures():
        cells = [cell(str(row.get(f, "") or "")) for f in BENCH_FIELDS]
        cells[-1] = f"`{cells[-1]}`" if cells[-1] else ""
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


GENERATORS = {
    "config-keys": config_keys,
    "exit-codes": exit_codes,
    "run-directory": run_directory,
    "checkpoint-file": checkpoint_file,
    "layers": layers,
    "benchmarks": benchmarks,
    "gpu-table": gpu_table,
    "package-modules": package_modules,
    "optimizer-interface": optimizer_interface,
}
