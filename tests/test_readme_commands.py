"""The commands, file references and links of the README and the ``docs/`` pages still match the repository.

The README and its ``docs/*.md`` pages (the measurement logs and details the README links to) quote dozens of commands
(benchmarks, the quality harness with its method specs, the examples) and name the results files their figures come
from. Scripts and options get renamed; a quoted command that no longer parses, a results file that is gone, or a link
to a page or section that moved is found here instead of by a reader. Every quoted command is parsed by its own
script's ``parse_args`` (flags, values, method specs: the checks each script makes before any work), in a temporary
working directory so that ``--output`` folders land there; nothing is run.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import sys

import pytest

from .conftest import REPO, documentation, load_script

DOCS = documentation()
README = DOCS["README.md"]

SCRIPTS = {
    "examples/quickstart.py": "readme_quickstart",
    "examples/classify.py": "readme_classify",
    "examples/sft_trl.py": "readme_sft_trl",
    "examples/generate.py": "readme_generate",
    "integration/bench_train.py": "readme_bench_train",
    "integration/bench_generate.py": "readme_bench_generate",
    "integration/profile_train.py": "readme_profile_train",
    "integration/profile_cuda.py": "readme_profile_cuda",
    "integration/real_shapes.py": "readme_real_shapes",
    "integration/arch_sweep.py": "readme_arch_sweep",
    "integration/quality/harness.py": "readme_harness",
}
SCRIPT_PATTERN = re.compile(r"(?:^|\s)((?:examples|integration)/[\w/]+\.py)(?=\s|$)")


def _shell_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, ``NAME="..."`` assignments substituted into later lines,
    a ``for v in a b; do CMD; done`` loop reduced to CMD with ``$v`` set to its first value."""
    variables: dict[str, str] = {}
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        assignment = re.fullmatch(r'(\w+)="([^"]*)"', line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        loop = re.fullmatch(r"for (\w+) in (\S+)[^;]*; do (.*); done", line)
        if loop:
            variables[loop.group(1)] = loop.group(2)
            line = loop.group(3)
        for name, value in variables.items():
            line = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", value, line)
        commands.append(line)
    return commands


def readme_commands() -> list[tuple[str, str, list[str]]]:
    """``(file, script, argv)`` for every quoted invocation of an example or integration script in the README and the
    ``docs/`` pages: in fenced code blocks, and in inline code spans that start with ``.venv/bin/python`` or
    ``python``."""
    commands = []
    for path, text in DOCS.items():
        candidates = []
        for block in re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.S | re.M):
            candidates += _shell_lines(block)
        candidates += re.findall(r"`((?:\.venv/bin/)?python [^`]+)`", text)
        for line in candidates:
            if not SCRIPT_PATTERN.search(line):
                continue
            words = shlex.split(line, comments=True)
            for index, word in enumerate(words):
                if word in SCRIPTS:
                    commands.append((path, word, words[index + 1:]))
                    break
            else:
                raise AssertionError(f"{path} quotes a script this test does not know (add it to SCRIPTS): {line}")
    return commands


COMMANDS = readme_commands()


def test_the_readme_quotes_commands_of_every_kind():
    """The extraction itself works: each kind of quoted command is found (a change of the README's code-block style
    would otherwise silently leave nothing to check)."""
    quoted = {script for _, script, _ in COMMANDS}
    assert {"integration/quality/harness.py", "integration/bench_train.py", "integration/bench_generate.py",
            "integration/real_shapes.py", "integration/arch_sweep.py", "examples/sft_trl.py"} <= quoted
    harness_specs = [argv for _, script, argv in COMMANDS if script == "integration/quality/harness.py"]
    assert any("qst:backbone_lora_layers=24,backbone_lora_r=64,backbone_lora_alpha=16,time_s=795.0,"
               "label=qst+lora24-wallclock" in argv for argv in harness_specs)
    # the README's own commands and those of the docs pages are both found
    assert {"README.md", "docs/quality.md", "docs/performance.md", "docs/architectures.md"} <= {
        path for path, _, _ in COMMANDS}


@pytest.fixture(scope="module")
def scripts():
    # the integration scripts import their shared helpers (measure.py, bench_train.py) from their own folder
    sys.path.insert(0, os.path.join(REPO, "integration"))
    return {path: load_script(path, name) for path, name in SCRIPTS.items()}


@pytest.mark.parametrize("path, script, argv", COMMANDS,
                         ids=[f"{p}:{s}:{' '.join(a)[:60]}" for p, s, a in COMMANDS])
def test_readme_command_parses(path, script, argv, scripts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if script == "examples/generate.py":  # the adapter the quickstart would have saved
        os.makedirs("outputs/qst-smollm2-quickstart")
        open("outputs/qst-smollm2-quickstart/adapter_config.json", "w").close()
    try:
        scripts[script].parse_args(argv)
    except SystemExit as err:  # argparse's usage error, printed to stderr
        pytest.fail(f"{path}'s command `{script} {shlex.join(argv)}` is refused (exit {err.code})")


def _expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [expanded for choice in match.group(1).split(",")
            for expanded in _expand_braces(path[:match.start()] + choice + path[match.end():])]


def readme_paths(text: str) -> list[str]:
    """Repository paths a documentation page names: ``integration/...``, ``examples/...``, ``tests/...``,
    ``peft_qst/...``, ``scripts/...`` (with ``{a,b}`` and ``*`` patterns), and bare results-file names, which live in
    ``integration/results/``. Targets of markdown links are left to the link check below (relative to the page)."""
    text = re.sub(r"\]\([^)\s]+\)", "]", text)
    named = re.findall(r"(?<![\w/.-])((?:integration|examples|tests|peft_qst|scripts)/[\w./*{},+-]*[\w*}/])", text)
    bare = re.findall(r"(?<![\w/.-])((?:quality|bench|profile|arch_sweep|real_shapes)_[\w.{},*-]*\.(?:json|txt))",
                      text)
    return sorted(set(named) | {f"integration/results/{name}" for name in bare})


@pytest.mark.parametrize("path", list(DOCS))
def test_every_path_the_readme_names_exists(path):
    paths = readme_paths(DOCS[path])
    if path == "docs/quality.md":  # the extraction itself works
        assert "integration/results/quality_hybrid24_seed3_cpu.json" in {p for x in paths for p in _expand_braces(x)}
    missing = [name for pattern in paths for name in _expand_braces(pattern)
               if not glob.glob(os.path.join(REPO, name))]
    assert not missing, f"{path} names files that do not exist: {missing}"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a markdown page's headings: lower case, punctuation dropped (``-`` and ``_`` kept),
    spaces turned into ``-``, and ``-1``, ``-2``, ... after repeats. Lines inside fenced code blocks are no headings."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def relative_links(text: str) -> list[str]:
    """Targets of the page's markdown links that are not URLs (``docs/quality.md#anchor``, ``#anchor``)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [target for target in re.findall(r"\[[^\[\]]*\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z][\w+.-]*:", target)]


def test_link_extraction_and_anchors():
    """The helpers themselves: GitHub's anchor rules on headings of this README, and a link broken over lines."""
    anchors = heading_anchors(README)
    assert {"performance-a-training-step-against-qlora-benchmark-integrationbench_trainpy", "options-qstconfig",
            "the-papers-design-options-downsample-x-r-x-initialisation", "supported-architectures"} <= anchors
    assert relative_links("see [the\nH200 section](docs/performance.md#on-a-gpu) and [PEFT](https://x.y/z)") == [
        "docs/performance.md#on-a-gpu"]


@pytest.mark.parametrize("path", list(DOCS))
def test_relative_links_resolve(path):
    """Every relative link of the README and the docs pages points to a file that exists and, where it names an
    anchor in a markdown page, to a heading of that page: the material moved between README.md and docs/*.md, and a
    "see X" that points nowhere is found here."""
    broken = []
    for target in relative_links(DOCS[path]):
        file, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO, os.path.dirname(path), file)) if file else os.path.join(REPO, path)
        if not os.path.exists(full):
            broken.append(f"{target} (no such file)")
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as handle:
                if anchor not in heading_anchors(handle.read()):
                    broken.append(f"{target} (no such heading)")
    assert not broken, f"{path} has broken links: {broken}"


def test_the_readme_links_every_docs_page():
    """Each docs page is reachable from the README (its table of contents), and links back to it."""
    linked = {os.path.normpath(target.partition("#")[0]) for target in relative_links(README)}
    pages = [path for path in DOCS if path != "README.md"]
    assert pages, "no docs/*.md pages found"
    unlinked = [page for page in pages if page not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
    for page in pages:
        assert any(target.startswith("../README.md") for target in relative_links(DOCS[page])), page


def test_the_code_map_names_every_module_of_the_package():
    """docs/code.md lists the package module by module: a module added, split or removed is found here."""
    listed = set(re.findall(r"^\| `(peft_qst/\w+\.py)` \|", DOCS["docs/code.md"], flags=re.M))
    modules = {f"peft_qst/{name}" for name in os.listdir(os.path.join(REPO, "peft_qst")) if name.endswith(".py")}
    assert listed == modules, f"docs/code.md vs peft_qst/: {sorted(listed ^ modules)}"


def test_options_table_matches_qstconfig_defaults():
    """The README's Options table lists every user-facing ``QSTConfig`` field with the default the code has."""
    from peft_qst import QSTConfig

    section = README.split("### Options (`QSTConfig`)", 1)[1].split("\n\n", 2)[1]
    documented = {}
    for fields, default in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \| ([^|]+) \|", section, flags=re.M):
        names = re.findall(r"`(\w+)`", fields)
        values = [value.strip() for value in default.split(",")]
        values = values if len(values) == len(names) else [default.strip()] * len(names)  # one default for all
        documented.update(zip(names, values))
    inherited = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                 "peft_version"}
    code = {field.name: field.default for field in dataclasses.fields(QSTConfig) if field.name not in inherited}
    assert set(documented) == set(code), f"table vs QSTConfig fields: {set(documented) ^ set(code)}"
    for name, default in code.items():
        written = documented[name].strip("`").strip('"')
        expected = "None" if default is None else str(default)
        assert written == expected or (isinstance(default, float) and float(written) == default), (
            f"README says {name} defaults to {documented[name]}, QSTConfig says {default!r}")


@pytest.mark.parametrize("page", sorted(DOCS))
def test_pages_keep_lines_within_120_characters(page):
    """Prose and code blocks wrap at 120 characters; only table rows may run longer (docs/code.md's list of the
    benchmarks ran to 133, a paragraph of docs/usage.md to 122)."""
    long = [(number, len(line)) for number, line in enumerate(DOCS[page].splitlines(), 1)
            if len(line) > 120 and not line.startswith("|")]
    assert not long, f"{page}: lines over 120 characters (line, length): {long}"
