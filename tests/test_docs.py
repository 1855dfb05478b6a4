"""The documentation runs: every Python snippet of README.md and docs/*.md, every `lightning-score` command.

How the docs are checked (a contributor editing a page needs only this):

* **Python blocks** (```python) of one page run in order, in one namespace, in a fresh temporary working
  directory (so ``runs/py/...`` paths of the page resolve there), in this process. They run in a *reduced
  form*: the substitutions in :data:`REDUCE` (every page) and :data:`PAGE_REDUCE` (one page) shorten the
  trainings (``max_steps=150`` -> a few steps) or swap what cannot run offline; each substitution must still
  find its text (a stale one fails the test), and the built-in digits base is pre-trained for a few steps
  only (:data:`QUICK_DIGITS_BASE`). The working directory also holds small synthetic task vectors named after
  PACS's domains (``art_painting.safetensors``, ``task_vectors/<domain>.safetensors``) for the pages that
  show real-data paths.
* **Shown output**: a ```text block right after a ```python block (only blank lines between) is what the
  block prints. The printed lines must match it, except that any number matches any number (a reduced run
  gives other accuracies) and ``...`` matches any text within a line.
* **Skipping**: ``<!-- docs-test: skip (reason) -->`` on the line before a block's fence skips it (for
  what needs a download or real data); the reason is required.
* **Signatures**: ``<!-- docs-test: signature -->`` before a block says it lists signatures
  (``name(param: type = default, ...) -> type``, one or more); each must name the same parameters, in the
  same order and kinds, with the same defaults, as ``inspect.signature`` of the object it names.
* **Commands**: every ``lightning-score ...`` command in a ```bash block, and every ``$ lightning-score``
  line of a ```text (or bare ```) block, is parsed, never run: ``--print_config`` is appended (``--help`` for
  ``analyze``), in a temporary folder where ``recipes/`` is the repository's and the YAML blocks of the page
  that start with ``# <name>.yaml`` are written. A ``$`` command followed by output lines must print them
  (numbers compared as above), e.g. an argument error.
* Nothing in the docs may cite ``shared/`` files (the specification users do not have): they cite papers.

Failures name the page and the line of the broken block. Pages in :data:`SLOW_PAGES` (several fits and
merges even reduced) run with ``-m slow``; the default run compiles them. ``LIGHTNING_SCORE_DOCS_FULL=1``
runs the snippets as shown (no size reduction; minutes), to refresh the outputs a page shows.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

QUICK_DIGITS_BASE = {"steps": 30, "batch_size": 64, "warmup_steps": 5}
"""The built-in base as the docs test builds it: 30 steps instead of 400 (same architecture and data)."""

REDUCE: list[tuple[str, str]] = [
    ("max_steps=150", "max_steps=3"),
    ("max_steps=40", "max_steps=6"),
    ("max_steps=16", "max_steps=3"),
]
"""(shown text, text that runs) for every page's Python blocks: fewer fine-tuning steps."""

PAGE_REDUCE: dict[str, list[tuple[str, str]]] = {
    "workflow.md": [
        # Experts of a few steps keep the base's LayerNorm biases (about 0), so the inputs of each block's first
        # layer lie close to one hyperplane and RegMean refuses their nearly singular Gram matrix; its paper's
        # regulariser makes it solvable (150-step experts, as shown, need none).
        (
            "        proxy_images=32,\n",
            "        proxy_images=32,\n"
            '        method_options={"reduce_non_diagonal": 0.9} if method == "regmean" else None,\n',
        ),
    ],
    "experts-and-data.md": [
        ('clip = build_clip("ViT-B-32", "openai")', "pass  # (docs test: no download)"),
        ('clip = build_clip("ViT-B-32", "/models/vitb32.safetensors")', "pass  # (docs test: no such file)"),
        (
            'save_clip_weights(clip.model, "mine.safetensors", model_name="ViT-B-32")',
            'save_clip_weights(clip.model, "mine.safetensors", model_name="tiny-ViT-W64-L2")',
        ),
    ],
}
"""Page-specific substitutions (page file name -> pairs), for what cannot run offline."""

PACS = ("art_painting", "cartoon", "photo", "sketch")

FULL = os.environ.get("LIGHTNING_SCORE_DOCS_FULL") == "1"
"""``LIGHTNING_SCORE_DOCS_FULL=1``: run the snippets as shown (no reduction, the real digits base; minutes), e.g.
to refresh the outputs a page shows: ``LIGHTNING_SCORE_DOCS_FULL=1 python -m pytest tests/test_docs.py -m ''``."""

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->$")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclasses.dataclass
class Block:
    """One fenced block of a page."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    directive: str = ""
    output: Block | None = None  # the ```text block that shows what a python block prints

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with their directives and shown outputs."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    last_end = -1  # line index after the previous block's closing fence
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, lang = opening.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : j]]
        previous = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        directive = DIRECTIVE.match(previous)
        block = Block(page, i + 1, lang, "\n".join(body), directive.group(1) if directive else "")
        if (
            lang == "text"
            and blocks
            and blocks[-1].lang == "python"
            and all(not line.strip() for line in lines[last_end:i])
        ):
            blocks[-1].output = block
        blocks.append(block)
        last_end = j + 1
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in read_blocks(page)]


# --- output matching ------------------------------------------------------------------------------------


def _line_pattern(shown: str) -> re.Pattern[str]:
    """A shown output line as a regular expression: numbers match numbers, ``...`` anything."""
    parts = []
    for piece in re.split(r"(\.\.\.)", shown.rstrip()):
        if piece == "...":
            parts.append(".*")
            continue
        pos = 0
        for number in NUMBER.finditer(piece):
            parts.append(re.escape(piece[pos : number.start()]))
            parts.append(NUMBER.pattern)
            pos = number.end()
        parts.append(re.escape(piece[pos:]))
    return re.compile("".join(parts) + r"\s*")


def assert_output_matches(where: str, shown: str, printed: str) -> None:
    shown_lines = [line for line in shown.splitlines() if line.strip()]
    actual = [line for line in printed.splitlines() if line.strip()]
    problem = ""
    if len(shown_lines) != len(actual):
        problem = f"{len(actual)} lines printed, {len(shown_lines)} shown"
    else:
        for shown_line, printed_line in zip(shown_lines, actual, strict=True):
            if not _line_pattern(shown_line).fullmatch(printed_line.rstrip()):
                problem = f"line {printed_line!r} does not match the shown {shown_line!r}"
                break
    if problem:
        pytest.fail(
            f"{where}: the output differs from the one shown ({problem}).\nPrinted:\n{printed}\nShown:\n{shown}"
        )


# --- python blocks --------------------------------------------------------------------------------------


def reduced(block: Block, used: set[tuple[str, str]]) -> str:
    """The code that runs: the page's substitutions always, the size reductions unless FULL."""
    code = block.text
    for pair in ([] if FULL else REDUCE) + PAGE_REDUCE.get(block.page.name, []):
        if pair[0] in code:
            code = code.replace(*pair)
            used.add(pair)
    return code


PAGES_WITH_DIGITS_EXPERTS = {"analysis.md"}
"""Pages that read ``runs/py/task_vectors/rot{0,30,60}.safetensors``, the experts workflow.md fine-tunes:
the docs test writes synthetic ones there (same names, keys and shapes), so their numbers differ."""


def _synthetic_task_vectors(folder: Path, page: Path) -> None:
    """Small task vectors named after PACS's domains (the pages' real-data examples), one base; and, for
    :data:`PAGES_WITH_DIGITS_EXPERTS`, stand-ins for the workflow page's digits experts."""
    from lightning_score import TaskVector
    from lightning_score.models import build_clip

    generator = torch.Generator().manual_seed(0)
    base = build_clip("tiny-ViT-W64-L2").model.visual.state_dict()
    (folder / "task_vectors").mkdir()
    for domain in PACS:
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
        tv = TaskVector.from_state_dicts(base, tuned, name=domain, domain=domain, base_model="tiny-ViT-W64-L2/random")
        tv.save(folder / f"{domain}.safetensors")
        tv.save(folder / "task_vectors" / f"{domain}.safetensors")
    if page.name in PAGES_WITH_DIGITS_EXPERTS:
        digits_base = build_clip("tiny-ViT-W96-L3").model.visual.state_dict()
        (folder / "runs" / "py" / "task_vectors").mkdir(parents=True)
        for domain in ("rot0", "rot30", "rot60"):
            tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in digits_base.items()}
            tv = TaskVector.from_state_dicts(digits_base, tuned, name=domain, domain=domain)
            tv.save(folder / "runs" / "py" / "task_vectors" / f"{domain}.safetensors")


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_python_page(page: Path, tmp_path: Path) -> None:
    blocks = [b for b in read_blocks(page) if b.lang == "python" and not b.directive.startswith(("skip", "signature"))]
    if not blocks:
        pytest.skip(f"{page.name} has no Python block to run")
    _synthetic_task_vectors(tmp_path, page)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    used: set[tuple[str, str]] = set()
    with working_directory(tmp_path):
        for block in blocks:
            code = reduced(block, used)
            printed = io.StringIO()
            namespace["print"] = functools.partial(print, file=printed)  # what the snippet prints, not Lightning
            try:
                exec(compile(code, f"{block.where}{'' if FULL else ' (reduced)'}", "exec"), namespace)
            except Exception as error:
                pytest.fail(f"{block.where}: the snippet fails: {type(error).__name__}: {error}\n{printed.getvalue()}")
            if block.output is not None:
                assert_output_matches(block.where, block.output.text, printed.getvalue())
    stale = [pair for pair in PAGE_REDUCE.get(page.name, []) if pair not in used]
    assert not stale, f"{page.name}: substitutions whose text is no longer on the page: {stale}"


SLOW_PAGES = {"workflow.md"}
"""Pages whose reduced run still takes most of a minute (several fits, merges and tests): marked slow; the
default run still compiles them and runs the README's fit -> merge -> test."""

PYTHON_PAGES = [
    pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in SLOW_PAGES else [])
    for p in PAGES
    if any(b.lang == "python" and not b.directive.startswith(("skip", "signature")) for b in read_blocks(p))
]


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_snippets_run_and_print_what_is_shown(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_score.models import digits_base

    if not FULL:
        for key, value in QUICK_DIGITS_BASE.items():
            monkeypatch.setitem(digits_base.BASE_DEFAULTS, key, value)
    run_python_page(page, tmp_path)


def test_python_snippets_compile() -> None:
    """Every Python snippet is valid Python (signature blocks excepted), slow pages included."""
    for block in all_blocks():
        if block.lang == "python" and block.directive != "signature":
            try:
                compile(block.text, block.where, "exec")
            except SyntaxError as error:
                pytest.fail(f"{block.where}: not valid Python: {error}")


def test_every_reduction_still_applies() -> None:
    text = "\n".join(b.text for b in all_blocks() if b.lang == "python")
    stale = [old for old, _ in REDUCE if old not in text]
    assert not stale, f"REDUCE entries no page uses any more (remove them): {stale}"


def test_skips_give_a_reason() -> None:
    for block in all_blocks():
        if block.directive.startswith("skip"):
            assert re.fullmatch(r"skip \(.+\)", block.directive), f"{block.where}: write 'skip (reason)'"


# --- signatures -----------------------------------------------------------------------------------------


def _resolve(name: str) -> object:
    for prefix in ("", "lightning_score.", "lightning_score.merging.", "lightning_score.analysis."):
        dotted = prefix + name
        with contextlib.suppress(ImportError):
            return importlib.import_module(dotted)
        module_name, _, attribute = dotted.rpartition(".")
        while module_name:
            try:
                obj: object = importlib.import_module(module_name)
            except ImportError:
                module_name, _, head = module_name.rpartition(".")
                attribute = f"{head}.{attribute}"
                continue
            try:
                for part in attribute.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                break
            return obj
    raise LookupError(name)


def _documented_signatures(text: str) -> list[tuple[str, ast.arguments]]:
    """Each ``name(params) -> ret`` of a block, parsed as the parameters of a function definition."""
    text = "\n".join(line.split("  #")[0] for line in text.splitlines())
    starts = [m.start() for m in re.finditer(r"^[A-Za-z_][\w.]*\(", text, flags=re.MULTILINE)]
    found = []
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        chunk = text[start:end].strip()
        name, _, rest = chunk.partition("(")
        tree = ast.parse(f"def _({rest}:\n    pass")
        function = tree.body[0]
        assert isinstance(function, ast.FunctionDef)
        found.append((name, function.args))
    return found


def _default_matches(documented: ast.expr, actual: object) -> bool:
    try:
        return ast.literal_eval(documented) == actual
    except ValueError:
        source = ast.unparse(documented)
        return source == getattr(actual, "__name__", None) or source == repr(actual)


SIGNATURE_BLOCKS = [b for b in all_blocks() if b.directive == "signature"]


@pytest.mark.parametrize("block", SIGNATURE_BLOCKS, ids=[b.where for b in SIGNATURE_BLOCKS])
def test_documented_signatures_are_the_code_s(block: Block) -> None:
    for name, arguments in _documented_signatures(block.text):
        obj = _resolve(name)
        actual = inspect.signature(obj)
        params = [p for p in actual.parameters.values() if p.name != "self"]
        shown = [*arguments.posonlyargs, *arguments.args]
        positional_defaults = [None] * (len(shown) - len(arguments.defaults)) + list(arguments.defaults)
        documented = [(a.arg, d, False) for a, d in zip(shown, positional_defaults, strict=True)]
        documented += [(a.arg, d, True) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)]
        if arguments.kwarg is not None:
            documented.append(("**" + arguments.kwarg.arg, None, False))
        expected = []
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                expected.append(("**" + p.name, None, False))
            else:
                expected.append((p.name, p.default, p.kind is p.KEYWORD_ONLY))
        assert [(n, k) for n, _, k in documented] == [(n, k) for n, _, k in expected], (
            f"{block.where}: {name}'s parameters are {[n for n, _, _ in expected]} "
            f"(keyword-only: {[n for n, _, k in expected if k]}), the page shows {[n for n, _, _ in documented]}"
        )
        for (param, shown_default, _), (_, real_default, _) in zip(documented, expected, strict=True):
            if param.startswith("**"):
                continue
            if real_default is inspect.Parameter.empty:
                assert shown_default is None, f"{block.where}: {name}({param}) has no default, the page shows one"
            else:
                assert shown_default is not None and _default_matches(shown_default, real_default), (
                    f"{block.where}: {name}({param}=...) defaults to {real_default!r}, the page shows "
                    f"{ast.unparse(shown_default) if shown_default is not None else 'none'}"
                )


# --- commands -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Command:
    where: str
    argv: list[str]
    expected: str | None = None  # shown output, for `$ lightning-score ...` lines


def _shell_lines(text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if line.strip()]


def _commands_in(line: str, variables: dict[str, str]) -> list[list[str]]:
    for name, value in variables.items():
        line = line.replace(f"${{{name}}}", value).replace(f"${name}", value)
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    commands, current = [], []
    for word in [*words, ";"]:
        if word in (";", "&&", "||", "|", "do", "then"):
            if "lightning-score" in current:
                commands.append(current[current.index("lightning-score") + 1 :])
            current = []
        else:
            current.append(word)
    return commands


def page_commands(page: Path) -> list[Command]:
    found = []
    for block in read_blocks(page):
        if block.lang == "bash":
            variables: dict[str, str] = {}
            for line in _shell_lines(block.text):
                loop = re.match(r"\s*for (\w+) in (\S+)", line)
                if loop:
                    variables[loop.group(1)] = loop.group(2)
                found += [Command(block.where, argv) for argv in _commands_in(line, variables)]
        elif block.lang in ("text", "console", ""):
            lines = block.text.splitlines()
            for k, line in enumerate(lines):
                if line.startswith("$ lightning-score "):
                    output = []
                    for following in lines[k + 1 :]:
                        if following.startswith("$ "):
                            break
                        output.append(following)
                    found.append(Command(block.where, shlex.split(line[2:])[1:], "\n".join(output)))
    return found


COMMANDS = [c for p in PAGES for c in page_commands(p)]


def _yaml_files(page_name: str) -> dict[str, str]:
    files = {}
    for page in PAGES:
        if page.name != page_name:
            continue
        for block in read_blocks(page):
            first = block.text.splitlines()[0] if block.text else ""
            named = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", first)
            if block.lang == "yaml" and named:
                files[named.group(1)] = block.text
    return files


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {' '.join(c.argv[:3])}" for c in COMMANDS])
def test_documented_commands_parse(command: Command, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_score.cli import main

    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    for name, text in _yaml_files(command.where.split(":")[0].rpartition("/")[2]).items():
        (tmp_path / name).write_text(text)
    argv = [*command.argv, "--help" if command.argv[:1] == ["analyze"] else "--print_config"]
    with working_directory(tmp_path), pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    if command.expected is not None:
        assert_output_matches(command.where, command.expected, captured.err.strip() or captured.out.strip())
    else:
        assert exit_info.value.code in (0, None), (
            f"{command.where}: `lightning-score {' '.join(command.argv)}` does not parse:\n{captured.err[-2000:]}"
        )


# --- self-contained --------------------------------------------------------------------------------------


CITED = re.compile(r"shared/|spec/|merge-methods\.md|\bspec\b")


def test_docs_cite_no_file_outside_the_repository() -> None:
    """Users have no ``shared/spec/...``: docs, README, recipe comments and docstrings cite papers instead."""
    files = [*PAGES, *(ROOT / "recipes").rglob("*.yaml"), *(ROOT / "lightning_score").rglob("*.py")]
    offending = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line if path.suffix != ".py" else _docstring_or_comment(line)
            if text and CITED.search(text):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "cite the paper, not a file users do not have:\n" + "\n".join(offending)


def test_dotted_names_in_the_docs_exist() -> None:
    """Every ``lightning_score.a.b`` the pages name in code spans imports (a moved name fails here)."""
    missing = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for name in re.findall(r"`(lightning_score(?:\.\w+)+)", line):
                try:
                    _resolve(name)
                except LookupError:
                    missing.append(f"{page.relative_to(ROOT)}:{number}: {name}")
    assert not missing, "names that do not exist:\n" + "\n".join(missing)


def test_the_tests_the_docs_name_exist() -> None:
    """A page that names ``test_file.py::test_name`` as evidence (strategies.md) names a test that exists."""
    sources: dict[str, str] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):  # two folders may hold a test_ddp.py: either one counts
        sources[path.name] = sources.get(path.name, "") + path.read_text()
    missing = []
    for page in PAGES:
        text = page.read_text()
        for file, first in re.findall(r"`(test_\w+\.py)::(test_\w+)", text):
            later = re.findall(r"`::(test_\w+)", text[text.index(f"{file}::{first}") :].split("\n", 1)[0])
            for name in [first, *later]:
                if f"def {name}(" not in sources.get(file, ""):
                    missing.append(f"{page.relative_to(ROOT)}: {file}::{name}")
    assert not missing, "tests the docs cite that do not exist:\n" + "\n".join(missing)


def test_the_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)(?:#[\w-]+)?\)", index))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= linked, f"docs/index.md does not list {sorted(pages - linked)}"


def _docstring_or_comment(line: str) -> str:
    """The part of a source line that a reader sees as prose (a comment, or any line of a docstring).

    Code lines rarely hold those words; variables called ``spec`` are code, so only comments and lines
    without an assignment or call are checked.
    """
    if "#" in line:
        return line.split("#", 1)[1]
    stripped = line.strip()
    if re.match(r"^[\w.\[\]]+\s*=|^\w+\(|^return |^if |^for ", stripped) or "spec." in stripped:
        return ""
    return stripped


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
