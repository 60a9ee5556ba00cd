"""The docs name only what exists: every repository path named in README.md, docs/*.md and the docstrings and
comments of stages/, shared/ and tests/ is a file or folder of the repository; every `--flag` the Markdown names is
an option of the `sdxl` command it is given to (or, named alone, of some command); every relative link between the
pages (and its #anchor) resolves; and the README states CI's test command."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_DIRS = ("stages", "shared", "tests")

# A repository path: it starts with a top-level folder or is one of the top-level files (or any upper-case
# Markdown name, so a page that was moved out of the top level or never was there is caught). Not preceded
# by a path character, so `/shared/work`, `work/ingest` or `.venv/bin/sdxl` are not taken for one.
PATH = re.compile(r"(?<![\w./<>~$@-])((?:stages|shared|tests|docs|\.ci)/[^\s`'\"()\[\],;:|]*"
                  r"|README\.md|pipeline\.toml|pyproject\.toml|BENCHMARKS\.md|[A-Z][A-Z_]*\.md)(?![\w-])")
PLACEHOLDER = re.compile(r"[<>*?{}]")  # <placeholders>, globs and brace patterns name no single path
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*(?![\w*-])")  # not `--lora-*`
COMMAND = re.compile(r"(?<![\w-])(?:sdxl|stages\.cli)[ \t]+([a-z][a-z-]*)(?:[ \t]+([a-z][a-z-]*))?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
OTHER_TOOL = re.compile(r"\s*(torchrun|accelerate|srun|sbatch|pip|python|bash)\b")  # their flags are not ours


def path_tokens(text: str) -> list[str]:
    return [token for _, token in located_path_tokens(text)]


def located_path_tokens(text: str) -> list[tuple[int, str]]:
    """(line within `text`, token) of each repository path `text` names."""
    found = []
    for m in PATH.finditer(text):
        token = m.group(1).rstrip(".")
        if not PLACEHOLDER.search(token):
            found.append((text.count("\n", 0, m.start()), token))
    return found


def missing(tokens: list[str]) -> list[str]:
    return [t for t in tokens if not (ROOT / t).exists()]


def python_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring (any string statement) of a Python file."""
    source = path.read_text(encoding="utf-8")
    texts = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    texts += [(node.lineno, node.value.value) for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
              and isinstance(node.value.value, str)]
    return texts


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines) of a Markdown page: fenced blocks are code, the rest prose."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


@lru_cache(maxsize=1)
def options() -> dict[str, frozenset[str]]:
    """Each `sdxl` command's option names (`--x` and `--no-x`, `--help`), by its words ('train', 'bench loader')."""
    import typer

    from stages.cli import app

    found: dict[str, frozenset[str]] = {}

    def walk(command, words: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, words + (name,))
            return
        names = {"--help"}
        for param in command.params:
            if getattr(param, "param_type_name", None) == "option":
                names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        found[" ".join(words)] = frozenset(names)

    walk(typer.main.get_command(app), ())
    return found


def flag_problems(text: str) -> list[str]:
    """Flags given to an `sdxl <command>` that the command lacks, and flags named alone that no command has. A span is
    an inline code span of the prose, or a line of a code block; in code only what follows an `sdxl <command>` is
    checked (other tools' flags, torchrun's or Slurm's, are not ours)."""
    commands = options()
    union = frozenset().union(*commands.values())
    prose, code = split_markdown(text)
    prose_text = "\n".join(prose)                   # a code span may go on over a line break
    spans = [(s.replace("\n", " "), False) for s in re.findall(r"`([^`]+)`", prose_text)]
    spans += [(line, False) for line in re.sub(r"`[^`]*`", " ", prose_text).splitlines()]   # flags in plain text
    spans += [(re.sub(r"(^|\s)#.*$", "", line), True) for line in "\n".join(code).replace("\\\n", " ").splitlines()]
    problems = []
    for span, in_code in spans:
        matches = list(COMMAND.finditer(span))
        if not matches and not in_code and not OTHER_TOOL.match(span):
            problems += [f"{flag} (no sdxl command has it)" for flag in FLAG.findall(span) if flag not in union]
        for i, m in enumerate(matches):
            words = m.group(1) if f"{m.group(1)} {m.group(2)}" not in commands else f"{m.group(1)} {m.group(2)}"
            end = matches[i + 1].start() if i + 1 < len(matches) else len(span)
            flags = FLAG.findall(span[m.end(1):end])
            if words not in commands:
                if words in {k.split()[0] for k in commands if " " in k}:   # a group: `sdxl bench`
                    continue
                if flags or in_code:
                    problems.append(f"`sdxl {words}`: no such command ({span.strip()})")
                continue
            problems += [f"{flag} is not an option of `sdxl {words}` ({span.strip()})"
                         for flag in flags if flag not in commands[words]]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text lower-cased, links reduced to their text, punctuation other than
    '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_markdown(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def link_problems(page: Path) -> list[str]:
    prose, _ = split_markdown(page.read_text(encoding="utf-8"))
    problems = []
    for target in LINK.findall(re.sub(r"`[^`]*`", "", "\n".join(prose))):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def test_every_path_named_in_a_docstring_or_comment_exists():
    stale = []
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for line, text in python_texts(path):
                stale += [f"{path.relative_to(ROOT)}:{line + offset}: {token}"
                          for offset, token in located_path_tokens(text) if missing([token])]
    assert not stale, "docstrings and comments name files that do not exist:\n" + "\n".join(stale)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_named_in_the_docs_exists(page):
    stale = missing(path_tokens(page.read_text(encoding="utf-8")))
    assert not stale, f"{page.relative_to(ROOT)} names files that do not exist: {stale}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_named_in_the_docs_is_an_option_of_its_command(page):
    problems = flag_problems(page.read_text(encoding="utf-8"))
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_between_the_pages_resolves(page):
    problems = link_problems(page)
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_states_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci == "bash .ci/setup && .venv/bin/python -m pytest"
    assert ci in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_checks_catch_what_they_are_for():
    """The patterns themselves: a stale path, a wrong flag, a flag of another command and a broken link are caught;
    placeholders, globs, output folders and other tools' flags are not taken for ours."""
    assert missing(path_tokens("see shared/stage.py and METHODS.md, or docs/nowhere.md")) == [
        "shared/stage.py", "METHODS.md", "docs/nowhere.md"]
    assert path_tokens("`work/ingest`, `$W/encode`, /shared/work, tests/test_*.py, shards/<W>x<H>/, "
                       "stages/<name>/, .venv/bin/sdxl") == []
    assert path_tokens("(`shared/core/stage.py`), tests/.") == ["shared/core/stage.py", "tests/"]
    assert flag_problems("`sdxl train --lora-rank 4 --no-wandb`, `--flip` and `sdxl bench loader --samples 10`") == []
    assert len(flag_problems("`sdxl train --no-such-flag`")) == 1
    assert len(flag_problems("`sdxl ingest --max-steps 3`")) == 1          # a train option given to ingest
    assert len(flag_problems("a `--made-up` option")) == 1
    assert len(flag_problems("a span over two lines, `sdxl encode\n--max-steps 3`")) == 1
    assert len(flag_problems("```bash\n.venv/bin/sdxl encode \\\n  --modell M\n```")) == 1
    assert flag_problems("```bash\ntorchrun --nproc-per-node 8 -m stages.cli train --model M  # --x\n```") == []
