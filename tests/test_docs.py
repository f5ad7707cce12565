"""The user documentation (docs/*.md) is true: every command block is marked, and exercised.

Convention (docs/index.md): every ```bash / ```python block in docs/*.md is preceded by a marker
line, either ``<!-- test: tests/test_x.py::test_name[, ...] -->`` (``slow`` before an id whose
test is marked slow; free text allowed) or ``<!-- not-run: needs ... -->``. A ```text block may be
preceded by ``<!-- message: name -->``: it quotes an error message that
``test_quoted_error_messages`` reproduces from the code.

What is checked here:

* structure (no JAX): every block is marked, every referenced test exists and its ``slow`` flag
  agrees with the test, every not-run reason says what is needed;
* links (no JAX): every relative link of README.md, docs/*.md and bench/README.md points at an
  existing file and, with a ``#anchor``, at an existing heading (GitHub's slugs); no .md file
  cites sections of the project's internal specification ("SPEC §...");
* every ``atdiff`` command anywhere in the docs uses real subcommands, flags and values, and every
  ``atdiff train`` command's config loads with its overrides (ml_collections flag parsing, as
  the CLI) and passes ``validate_config`` / ``build_experiment``;
* python blocks that cannot run here: their imports resolve and their keyword arguments fit;
* docs/configuration.md is what ``python docs/gen_config_reference.py`` writes, and lists every
  option of ``get_config()`` with its default;
* the quoted error messages are the ones the code produces;
* the user guide's commands run, in order, in a temporary project directory: ``configs/`` there
  holds wrappers that shrink every repository config to the size of configs/tiny.py (16x16, 32
  channels, T = 100, batch 8, 2 minibatches); the commands are the docs' text with the sizes
  rewritten (``--config.train.num_minibatches``, ``--num``, ``--num_samples``, ``--steps``,
  ``--nfe``, ``--batch_size``), run by bash with ``atdiff`` and ``python`` on PATH;
* the launch scripts' commands, with ``gcloud`` / ``sbatch`` / ``srun`` replaced by recorders; the
  ``atdiff train`` command they would run on the cluster is validated like the others.

Slow tests (``-m slow``) run ``launch/local.sh``, the fine-tuning walkthrough and the 8-device
resume the same way.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SHELL_LANGS = ("bash", "sh", "shell", "console")
CHECKED_LANGS = SHELL_LANGS + ("python",)
THIS = "tests/test_docs.py"
TIMEOUT_S = 900

# --------------------------------------------------------------------------------------------
# parsing the docs

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_CLOSE = re.compile(r"^\s*```\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(test|not-run|message):\s*(.*?)\s*-->\s*$")
_TEST_ID = re.compile(r"(slow\s+)?(tests/[\w/]+\.py)::(\w+)")


@dataclasses.dataclass
class Block:
    path: pathlib.Path
    line: int                 # 1-based line of the opening fence
    lang: str
    text: str
    kind: str | None          # "test" | "not-run" | "message" | None
    detail: str               # the marker's text after the colon

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def test_ids(self) -> list[tuple[bool, str, str]]:
        """``(slow, file, name)`` of every test id in a test marker."""
        return [(bool(s), f, n) for s, f, n in _TEST_ID.findall(self.detail)]


def parse_blocks(path: pathlib.Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        body, j = [], i + 1
        while j < len(lines) and not _CLOSE.match(lines[j]):
            body.append(lines[j].removeprefix(indent))
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: unterminated code block")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.match(lines[k]) if k >= 0 else None
        blocks.append(Block(path, i + 1, lang, "\n".join(body) + "\n",
                            marker.group(1) if marker else None,
                            marker.group(2) if marker else ""))
        i = j + 1
    return blocks


def doc_files() -> list[pathlib.Path]:
    return sorted(DOCS.glob("*.md"))


def all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in parse_blocks(p)]


def blocks_for(test_name: str) -> list[Block]:
    """The blocks whose marker names ``tests/test_docs.py::test_name`` (in document order)."""
    found = [b for b in all_blocks() if b.kind == "test"
             and any(f == THIS and n == test_name for _, f, n in b.test_ids())]
    assert found, f"no block in docs/ is marked with {THIS}::{test_name}"
    return found


def logical_lines(text: str) -> list[str]:
    """Shell text -> lines with backslash continuations joined."""
    return [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]


def _words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        return list(lex)
    except ValueError:  # an unbalanced quote spanning lines (e.g. a multi-line --command="...")
        return line.split()


def simple_commands(text: str) -> list[list[str]]:
    """The words of every simple command (split at && || ; | &), env assignments dropped."""
    out = []
    for line in logical_lines(text):
        cmd: list[str] = []
        for w in _words(line) + [";"]:
            if w in ("&&", "||", ";", "|", "&", ";;"):
                while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
                    cmd.pop(0)
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def atdiff_commands() -> list[tuple[str, list[str], bool]]:
    """``(where, argv after 'atdiff', complete)`` of every atdiff command in shell blocks
    (complete commands) and in inline code spans of the prose (often fragments such as
    `atdiff sample --eps_scale`: only their flags are checked)."""
    found = []
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        for b in parse_blocks(path):
            if b.lang in SHELL_LANGS:
                found += [(b.where, c[1:], True) for c in simple_commands(b.text)
                          if c[0] == "atdiff"]
        prose = re.sub(r"^\s*```.*?^\s*```\s*$", "", text, flags=re.DOTALL | re.MULTILINE)
        for span in re.findall(r"`(atdiff [^`]+)`", prose):
            if any(ch in span for ch in "<>|") or "..." in span:
                continue  # a placeholder, not a command
            found.append((f"{path.relative_to(ROOT)} (inline)", span.split()[1:], False))
    return found


# --------------------------------------------------------------------------------------------
# 1. structure (no JAX)


def _defined_tests(file: str) -> dict[str, bool]:
    """``{test name: has the slow marker}`` of a test file's module-level test functions."""
    tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            out[node.name] = any("mark.slow" in ast.unparse(d) for d in node.decorator_list)
    return out


def test_every_code_block_is_marked_and_its_tests_exist():
    blocks = all_blocks()
    assert len(blocks) > 20, "docs/ has (almost) no code blocks: parsing failed?"
    problems = []
    for b in blocks:
        if not b.lang:
            problems.append(f"{b.where}: code block without a language")
        elif b.lang in CHECKED_LANGS and b.kind not in ("test", "not-run"):
            problems.append(f"{b.where}: {b.lang} block without a <!-- test: ... --> or "
                            "<!-- not-run: needs ... --> marker")
        elif b.kind == "message" and b.lang != "text":
            problems.append(f"{b.where}: a message marker must precede a text block")
        if b.kind == "not-run" and not re.match(r"needs \S", b.detail):
            problems.append(f"{b.where}: a not-run reason must say what it needs "
                            f"('needs ...'), got {b.detail!r}")
        if b.kind == "test":
            ids = b.test_ids()
            if not ids:
                problems.append(f"{b.where}: test marker names no tests/...py::test_name")
            for slow, file, name in ids:
                if not (ROOT / file).is_file():
                    problems.append(f"{b.where}: {file} does not exist")
                    continue
                tests = _defined_tests(file)
                if name not in tests:
                    problems.append(f"{b.where}: {file}::{name} does not exist")
                elif tests[name] != slow:
                    problems.append(f"{b.where}: {file}::{name} is {'' if tests[name] else 'not '}"
                                    f"marked slow; write {'slow ' if tests[name] else ''}{file}::"
                                    f"{name} in the marker")
    assert not problems, "\n".join(problems)


def test_the_structure_check_catches_bad_markers(tmp_path):
    """The parser sees a missing marker, a dangling test id and a reason without 'needs'."""
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```bash\nls\n```\n\n<!-- test: tests/test_docs.py::test_nope -->\n"
                   "```bash\nls\n```\n<!-- not-run: GPU -->\n```python\nx = 1\n```\n"
                   "  <!-- test: slow tests/test_cli.py::test_usage_errors -->\n  ```bash\n"
                   "  atdiff sample\n  ```\n")
    blocks = parse_blocks(doc)
    assert [(b.line, b.lang, b.kind) for b in blocks] == [
        (3, "bash", None), (8, "bash", "test"), (12, "python", "not-run"), (16, "bash", "test")]
    assert blocks[1].test_ids() == [(False, THIS, "test_nope")]
    assert "test_nope" not in _defined_tests(THIS)
    assert not re.match(r"needs \S", blocks[2].detail)
    assert blocks[3].test_ids() == [(True, "tests/test_cli.py", "test_usage_errors")]
    assert _defined_tests("tests/test_cli.py")["test_usage_errors"] is False  # not slow: caught
    assert blocks[3].text == "atdiff sample\n"


def test_shell_parsing():
    text = ("X=1 atdiff train --config=a.py \\\n    --config.b=2 & \nsleep 1 && kill $!\n"
            "SHA=$(sha256sum f | cut -d' ' -f1)\natdiff sample --workdir=r # comment\n")
    assert simple_commands(text) == [
        ["atdiff", "train", "--config=a.py", "--config.b=2"], ["sleep", "1"], ["kill", "$!"],
        ["(", "sha256sum", "f"], ["cut", "-d ", "-f1", ")"], ["atdiff", "sample", "--workdir=r"]]
    assert cheap("atdiff sample --workdir=r --num=64 --steps=50\n") == (
        "atdiff sample --workdir=r --num=4 --steps=3 --batch_size=4\n")
    assert cheap("atdiff train --config=c.py --config.adv.steps=5 \\\n"
                 "  --config.train.num_minibatches=800\n", minibatches=3) == (
        "atdiff train --config=c.py --config.adv.steps=5    --config.train.num_minibatches=3\n")


# --------------------------------------------------------------------------------------------
# 1b. links and references (no JAX)

# The pages whose relative links are checked: the front page, the docs, the benchmarks' page.
LINKED_PAGES = ("README.md", "docs/*.md", "bench/README.md")
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _strip_code(text: str, spans: bool = True) -> str:
    """Markdown text with fenced code blocks blanked (line numbers kept) and, with ``spans``,
    code spans removed."""
    out, fence = [], None
    for line in text.splitlines():
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)[0] * 3
            out.append("")
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line) if spans else line)
    return "\n".join(out)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text lower-cased, every
    character but letters, digits, marks, ``_``, ``-`` and spaces removed, spaces -> ``-``."""
    import unicodedata
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*\*|\*)", "", text)
    kept = [ch for ch in text.lower()
            if ch in "-_ " or unicodedata.category(ch)[0] in "LNM"
            or unicodedata.category(ch) == "Pc"]
    return "".join(kept).replace(" ", "-")


def heading_anchors(path: pathlib.Path) -> set[str]:
    """Every anchor of a markdown file's headings, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _strip_code(path.read_text(encoding="utf-8"), spans=False).splitlines():
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(path: pathlib.Path) -> list[str]:
    """Relative links of ``path`` that point at no file, or at no heading of the file."""
    problems = []
    for lineno, line in enumerate(_strip_code(path.read_text(encoding="utf-8")).splitlines(), 1):
        for m in _LINK.finditer(line):
            target = m.group(2)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue   # https:, mailto: ...
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{lineno}: ({target})"
            if not dest.exists():
                problems.append(f"{where}: {file_part} does not exist")
            elif anchor:
                if dest.suffix != ".md" or dest.is_dir():
                    problems.append(f"{where}: an anchor into a file that is not markdown")
                elif anchor not in heading_anchors(dest):
                    problems.append(f"{where}: {dest.name} has no heading with the anchor "
                                    f"#{anchor}")
    return problems


def test_relative_links_point_at_files_and_headings():
    pages = sorted({p for pattern in LINKED_PAGES for p in ROOT.glob(pattern)})
    assert ROOT / "README.md" in pages and DOCS / "method.md" in pages and len(pages) >= 10
    problems = [p for page in pages for p in broken_links(page)]
    assert not problems, "\n".join(problems)
    # the docs link the method's sections that other pages (and the code) cite
    assert {"the-objective", "consistency-models", "fast-at", "pgd-at",
            "at-for-consistency-models", "baselines", "hyper-parameters",
            "what-is-inferred"} <= heading_anchors(DOCS / "method.md")


def test_the_link_check_catches_broken_links(tmp_path):
    assert github_slug("Fine-tuning from `.pt` files") == "fine-tuning-from-pt-files"
    assert github_slug("The method and the paper's configs") == "the-method-and-the-papers-configs"
    assert github_slug("Equal updates: fast AT vs `clean_kx`") == "equal-updates-fast-at-vs-clean_kx"
    assert github_slug("Results (lr 1e-4, 3 training seeds)") == "results-lr-1e-4-3-training-seeds"
    assert github_slug("AT for [consistency](x.md) models") == "at-for-consistency-models"
    (tmp_path / "other.md").write_text("# Title\n\n## Part\n\n## Part\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#part-1) [ok](other.md) [ok](#here) [web](https://x.org/#y)\n"
                    "## Here\n`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
                    "[gone](missing.md) [no anchor](other.md#part-2) ![img](other.md#title)\n"
                    "[code anchor](other.md#not-a-heading)\n")
    assert heading_anchors(tmp_path / "other.md") == {"title", "part", "part-1"}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys.modules[__name__], "ROOT", tmp_path)
        problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.md does not exist" in problems[0]
    assert "#part-2" in problems[1] and "#not-a-heading" in problems[2]


SPEC_REFERENCE = re.compile(r"SPEC\s*§")


def markdown_files() -> list[pathlib.Path]:
    """Every .md file of the repository (outside hidden, run, data and virtualenv folders)."""
    return _repo_files("*.md")


def _repo_files(pattern: str) -> list[pathlib.Path]:
    skip = {"runs", "data", "node_modules", "weights", "reports"}
    return sorted(p for p in ROOT.rglob(pattern)
                  if not any(part.startswith(".") or part in skip
                             for part in p.relative_to(ROOT).parts[:-1]))


def test_no_file_cites_spec_sections():
    """The docs and the code say what the method is (docs/method.md) instead of citing sections
    of the project's internal specification, which readers do not have: every .md, .py, .sh and
    notebook file (this test file names the pattern it looks for, and is left out)."""
    files = [p for pattern in ("*.md", "*.py", "*.sh", "*.ipynb") for p in _repo_files(pattern)
             if p != pathlib.Path(__file__).resolve()]
    assert ROOT / "README.md" in files and ROOT / "atdiff_jax" / "train" / "step.py" in files
    problems = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
                for p in files
                for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                if SPEC_REFERENCE.search(line)]
    assert not problems, ("replace each by what it means and a link to docs/method.md:\n"
                          + "\n".join(problems))
    assert SPEC_REFERENCE.search("as in SPEC §3.1") and not SPEC_REFERENCE.search("the spec")


# --------------------------------------------------------------------------------------------
# 2. every atdiff command: real flags and values; every train command: its config validates


def _flag_items(argv: list[str]):
    """``(name, value or None)`` of every --flag of an atdiff argv; positional words as (None, w)."""
    for w in argv:
        if w.startswith("--"):
            name, eq, value = w[2:].partition("=")
            yield name, (value if eq else None)
        else:
            yield None, w


def check_atdiff_command(argv: list[str], complete: bool = True) -> list[str]:
    """Problems with one atdiff command line (argv after 'atdiff'); [] when it is valid.

    ``complete=False`` (a fragment quoted in prose): only the flags are checked."""
    from atdiff_jax import cli
    from atdiff_jax.eval import report
    if not argv or argv[0] not in cli.COMMANDS:
        return [f"unknown subcommand {argv[:1]} (known: {cli.COMMANDS})"]
    command, rest = argv[0], argv[1:]
    positional = [w for name, w in _flag_items(rest) if name is None]
    expected = {"data": ["prepare"], "convert": ["inception"]}.get(command, [])
    problems = []
    if complete and positional != expected:
        problems.append(f"atdiff {command}: positional arguments {positional}, expected {expected}")
    for name, value in _flag_items(rest):
        if name is None or name.startswith(("config.", "spec.")):
            continue
        bare = name[2:] if name.startswith("no") and name[2:] in cli.FLAGS else name
        if bare not in cli.FLAGS:
            problems.append(f"--{name}: no such flag")
            continue
        if value is None or "$" in value:
            continue
        try:
            parsed = cli.FLAGS[bare].parser.parse(value)
        except (ValueError, TypeError) as e:
            problems.append(f"--{name}={value}: {e}")
            continue
        allowed = {"metrics": report.METRICS, "samplers": report.ALL_EVAL_SAMPLERS}.get(bare)
        if allowed and any(v not in allowed for v in parsed):
            problems.append(f"--{name}={value}: allowed {allowed}")
        if bare == "nfe" and not all(v.isdigit() and int(v) > 0 for v in parsed):
            problems.append(f"--nfe={value}: positive integers")
    if complete and command == "train" and not any(n == "config" for n, _ in _flag_items(rest)):
        problems.append("atdiff train without --config")
    return problems


def test_atdiff_commands_name_real_flags():
    commands = atdiff_commands()
    assert len(commands) > 20
    assert {argv[0] for _, argv, _ in commands} >= {"train", "sample", "eval", "data", "convert"}
    problems = [f"{where}: atdiff {' '.join(argv)}: {p}"
                for where, argv, complete in commands for p in check_atdiff_command(argv, complete)]
    assert not problems, "\n".join(problems)
    # the check itself catches the usual mistakes
    assert check_atdiff_command(["sample", "--sampler=heun"])
    assert check_atdiff_command(["eval", "--metrics=lpips"])
    assert check_atdiff_command(["sample", "--num_samplez=3"])
    assert check_atdiff_command(["data", "prepare", "extra"])
    assert check_atdiff_command(["train", "--workdir=x"])


def load_train_config(argv: list[str], root: pathlib.Path = ROOT):
    """The config an ``atdiff train`` argv (after 'atdiff') would train, parsed like the CLI.

    Shell variables in values (``$SHA``) become a 64-character placeholder.
    """
    from absl import flags
    from ml_collections import config_flags
    words = []
    for w in argv[1:]:
        if w.startswith("--config"):
            name, eq, value = w.partition("=")
            if "$" in value:
                value = "0" * 64
            if name == "--config" and not os.path.isabs(value):
                value = str(root / value)
            words.append(f"{name}{eq}{value}")
    fv = flags.FlagValues()
    sys_argv = ["atdiff", *words]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=sys_argv)
    fv(sys_argv)
    return fv.config


def validate_train_command(argv: list[str]) -> str | None:
    """None when the train command's config builds, else the error."""
    from atdiff_jax.train.build import build_experiment, build_optimizer
    try:
        config = load_train_config(argv)
        build_experiment(config)   # validate_config first, then the model, diffusion, adversary
        build_optimizer(config)
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"{type(e).__name__}: {e}"
    return None


def test_train_commands_load_and_validate():
    trains = [(w, a) for w, a, complete in atdiff_commands() if complete and a[0] == "train"]
    assert len(trains) >= 10
    problems = [f"{where}: atdiff {' '.join(argv)}\n  {err}" for where, argv in trains
                if (err := validate_train_command(argv))]
    assert not problems, "\n".join(problems)
    # overrides reach the config with their types, and bad ones are caught
    config = load_train_config(["train", "--config=configs/mnist_adm_at.py",
                                "--config.train.ema_rates=0.999,0.9999", "--config.adv.steps=5"])
    assert tuple(config.train.ema_rates) == (0.999, 0.9999) and config.adv.steps == 5
    assert "adv.kind" in validate_train_command(["train", "--config=configs/tiny.py",
                                                 "--config.adv.kind=freelb"])
    assert validate_train_command(["train", "--config=configs/tiny.py", "--config.adv.nosuch=1"])


def _imported_names(tree: ast.Module) -> dict[str, object]:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = importlib.import_module(alias.name)
    return names


def test_python_blocks_resolve():
    """Python blocks that cannot run here: imports exist, keyword arguments fit the signatures
    (``unet_from_checkpoint``'s model arguments build the model, ``diffusion_from_args`` runs)."""
    from atdiff_jax.convert import guided_diffusion as gd
    for b in blocks_for("test_python_blocks_resolve"):
        assert b.lang == "python", b.where
        tree = ast.parse(b.text)
        names = _imported_names(tree)
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id in names]
        assert calls, f"{b.where}: no call of an imported function"
        for call in calls:
            fn = names[call.func.id]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
            inspect.signature(fn).bind(*([None] * len(call.args)), **kwargs)
            if fn in (gd.unet_from_checkpoint, gd.unet_from_state_dict):
                gd.create_model(**kwargs)
            if fn is gd.diffusion_from_args:
                assert fn(**kwargs).num_timesteps == kwargs.get("steps", 1000)


# --------------------------------------------------------------------------------------------
# 3. the configuration reference


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference",
                                                  DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date(tmp_path):
    """The docs' commands, run on a copy of the generator and configs/default.py, write exactly
    docs/configuration.md, and --check fails on a stale file."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "configs").mkdir()
    shutil.copy(DOCS / "gen_config_reference.py", tmp_path / "docs")
    shutil.copy(ROOT / "configs" / "default.py", tmp_path / "configs")
    env = _tool_env(tmp_path / "bin")
    for b in blocks_for("test_config_reference_is_up_to_date"):
        res = _bash(b.text, tmp_path, env)
        assert res.returncode == 0, res.stderr
    written = (tmp_path / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == (DOCS / "configuration.md").read_text(encoding="utf-8"), (
        "docs/configuration.md is out of date with configs/default.py: run "
        "python docs/gen_config_reference.py")
    (tmp_path / "docs" / "configuration.md").write_text(written.replace("`42`", "`43`"))
    res = _bash("python docs/gen_config_reference.py --check", tmp_path, env)
    assert res.returncode == 1 and "out of date" in res.stderr


def test_config_reference_lists_every_option_with_its_default():
    import runpy
    values = _generator().flatten(runpy.run_path(str(ROOT / "configs" / "default.py"))
                                  ["get_config"]())
    rows = {}
    for line in (DOCS / "configuration.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([\w.]+)` \| `(.*?)` \| (.*) \|$", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            rows[m.group(1)] = (m.group(2).replace("\\|", "|"), m.group(3).strip())
    assert set(rows) == set(values), (sorted(set(values) - set(rows)),
                                      sorted(set(rows) - set(values)))
    for path, value in values.items():
        default, meaning = rows[path]
        shown = ast.literal_eval(default)
        assert shown == value and type(shown) is type(value), (path, default, value)
        assert meaning, f"{path} has no description: add a comment in configs/default.py"
    assert len(values) > 80


def test_config_reference_generator_reads_comments(tmp_path):
    """Trailing comments, continuation lines, notes and sections end up where they belong."""
    src = tmp_path / "default.py"
    src.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.seed = 1  # the seed\n\n"
        "    # ----------- things (a section)\n"
        "    c.things = t = ml_collections.ConfigDict()\n"
        "    # a note about what follows\n"
        "    t.a = 1_000                  # first line\n"
        "                                 # second line | with a pipe\n"
        "    t.b = (0.5,)                 # a tuple\n"
        "    t.c = 'x*y<z>'\n"
        "    return c\n")
    gen = _generator()
    text = gen.render(gen.parse(src))
    assert "## things (a section)" in text and "Options `things.*`." in text
    assert "\na note about what follows\n" in text
    assert "| `things.a` | `1_000` | first line second line \\| with a pipe |" in text
    assert "| `things.b` | `(0.5,)` | a tuple |" in text
    assert "| `things.c` | `'x*y<z>'` |  |" in text  # no comment: an empty meaning (test above)
    assert text.index("| `seed` | `1` | the seed |") < text.index("## things")


# --------------------------------------------------------------------------------------------
# 4. quoted error messages


def _message_producers(tmp_path: pathlib.Path, data_dir: pathlib.Path) -> dict:
    """name -> a function returning (message as the code renders it, {actual: doc placeholder})."""
    import runpy

    import jax
    import ml_collections

    def default_config():
        return runpy.run_path(str(ROOT / "configs" / "default.py"))["get_config"]()

    def tiny_config():
        return runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()

    def error_of(fn, *args, **kw) -> str:
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001
            return str(e)
        raise AssertionError(f"{fn.__name__} did not raise")

    def dataset_not_prepared():
        from atdiff_jax.data.pipeline import open_builder
        return error_of(open_builder, "mnist32", data_dir=tmp_path / "data"), {
            str(tmp_path): "/home/me"}

    def bad_choice():
        from atdiff_jax.train.build import validate_config
        c = default_config()
        c.adv.kind = "freelb"
        return error_of(validate_config, c), {}

    def microbatches_do_not_divide():
        from atdiff_jax.train.build import validate_config
        c = default_config()
        c.train.microbatches = 3
        return error_of(validate_config, c), {}

    def fsdp_does_not_divide():
        from atdiff_jax.train.loop import train
        c = tiny_config()
        c.mesh.fsdp = 3
        return (error_of(train, c, str(tmp_path / "run")),
                {f"({jax.device_count()})": "(1)"})

    def data_pipeline_changed():  # what train raises when set_state fails
        from atdiff_jax.data.pipeline import DataStateMismatchError, create_train_iterator
        from atdiff_jax.train.build import resume_data_error
        kw = {"dataset": "mnist32", "data_dir": data_dir, "seed": 0, "process_index": 0,
              "process_count": 1}
        state = create_train_iterator(global_batch_size=8, **kw).get_state()
        it = create_train_iterator(global_batch_size=16, **kw)
        with pytest.raises(DataStateMismatchError) as e:
            it.set_state(state)
        return str(resume_data_error(e.value.mismatched, "/home/me/runs/x", 4)), {}

    def unknown_option():
        from atdiff_jax.cli import unknown_override
        config = ROOT / "configs" / "mnist_adm_at.py"
        return (unknown_override(["atdiff", "train", f"--config={config}",
                                  "--config.train.global_bach_size=16"]),
                {f"{ROOT}{os.sep}": ""})

    def sha256_mismatch():
        from atdiff_jax.convert import load_torch_state_dict
        pt = tmp_path / "model.pt"
        pt.write_bytes(b"not a checkpoint\n")
        return ("CheckpointIntegrityError: " + error_of(load_torch_state_dict, pt, sha256="0" * 64),
                {str(tmp_path): "/home/me"})

    def teacher_without_checkpoints():
        from atdiff_jax.train.loop import load_teacher
        c = runpy.run_path(str(ROOT / "configs" / "mnist_cd_at.py"))["get_config"]()
        c.teacher.workdir = "runs/mnist_adm"
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            return error_of(load_teacher, ml_collections.ConfigDict(c)), {
                str(tmp_path): "/home/me"}
        finally:
            os.chdir(cwd)

    return {f.__name__: f for f in (dataset_not_prepared, bad_choice, microbatches_do_not_divide,
                                    fsdp_does_not_divide, data_pipeline_changed, sha256_mismatch,
                                    teacher_without_checkpoints, unknown_option)}


def test_quoted_error_messages(tmp_path, prepared):
    producers = _message_producers(tmp_path, prepared / "data")
    quoted = [b for b in all_blocks() if b.kind == "message"]
    assert {b.detail for b in quoted} == set(producers), "a quoted message without a producer"
    for b in quoted:
        message, placeholders = producers[b.detail]()
        for actual, shown in placeholders.items():
            message = message.replace(actual, shown)
        assert b.text.strip() == message.strip(), f"{b.where}: the code says\n{message}"


# --------------------------------------------------------------------------------------------
# 4b. the bad-input table of docs/troubleshooting.md

TABLE_MARK = "<!-- bad-input-table -->"
TROUBLESHOOTING = DOCS / "troubleshooting.md"


@dataclasses.dataclass
class BadInput:
    line: int                       # 1-based line in docs/troubleshooting.md
    bad_input: str                  # the first cell, as written
    message: str                    # the first code span of the second cell (or the cell)
    quoted: bool                    # the second cell starts with a code span
    spans: list[str]                # every code span of the second cell
    tests: list[tuple[str, str]]    # (file, test name) of the third cell

    @property
    def id(self) -> str:
        return re.sub(r"\W+", "_", self.bad_input.replace("`", ""))[:60].strip("_")


def _table_cells(line: str) -> list[str]:
    cells, cur, i = [], "", 0
    body = line.strip()[1:-1]
    while i < len(body):   # split at | outside code spans (messages hold none, but be safe)
        if body[i] == "`":
            n = len(body[i:]) - len(body[i:].lstrip("`"))
            end = body.find("`" * n, i + n)
            end = len(body) if end < 0 else end + n
            cur += body[i:end]
            i = end
        elif body[i] == "|" and (i == 0 or body[i - 1] != "\\"):
            cells.append(cur.strip())
            cur, i = "", i + 1
        else:
            cur += body[i]
            i += 1
    return cells + [cur.strip()]


def _code_spans(cell: str) -> list[str]:
    """The contents of the code spans of a cell (``x`` and ````x````), in order."""
    return [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)(?<!`)\1(?!`)", cell)]


def bad_input_rows() -> list[BadInput]:
    lines = TROUBLESHOOTING.read_text(encoding="utf-8").splitlines()
    start = lines.index(TABLE_MARK)
    rows = []
    for k in range(start + 3, len(lines)):   # the marker, the header, the |---| line
        if not lines[k].startswith("|"):
            break
        bad, got, tests = _table_cells(lines[k])
        spans = _code_spans(got)
        quoted = got.startswith("`")
        rows.append(BadInput(k + 1, bad, spans[0] if quoted else got, quoted, spans,
                             [(f, n) for _, f, n in _TEST_ID.findall(tests)]))
    return rows


def _matches(documented: str, actual: str) -> bool:
    """``documented`` with ``...`` standing for any text equals ``actual``."""
    pattern = ".*".join(re.escape(part) for part in documented.split("..."))
    return re.fullmatch(pattern, actual, flags=re.DOTALL) is not None


def test_bad_input_table_is_complete_and_names_existing_tests():
    """At least 15 rows; every row names tests that exist (read from the files, not run); a row
    the table test cannot reproduce quotes only text found in its tests or in the code."""
    rows = bad_input_rows()
    assert len(rows) >= 15, f"{len(rows)} rows"
    producers = _bad_input_producers(None, None)
    problems = []
    for r in rows:
        where = f"docs/troubleshooting.md:{r.line}"
        if not r.tests:
            problems.append(f"{where}: no tests/...py::test_name in the last column")
        for file, name in r.tests:
            if not (ROOT / file).is_file() or name not in _defined_tests(file):
                problems.append(f"{where}: {file}::{name} does not exist")
        if r.id not in producers:
            sources = "".join((ROOT / f).read_text(encoding="utf-8") for f, _ in r.tests
                              if (ROOT / f).is_file())
            sources += "".join(p.read_text(encoding="utf-8")
                               for p in (ROOT / "atdiff_jax").rglob("*.py"))
            problems += [f"{where}: {span!r} is in neither its tests nor the code"
                         for span in r.spans if span not in sources]
    assert not problems, "\n".join(problems)
    unknown = set(producers) - {r.id for r in rows}
    assert not unknown, f"producers for rows that are not in the table: {sorted(unknown)}"
    assert sum(r.id in producers for r in rows) >= len(rows) - 2, "rows not reproduced"


def test_bad_input_table_parser():
    cells = _table_cells("| `a` (b) | ``x `y` z``, then `w` | `tests/test_x.py::test_y` |")
    assert cells == ["`a` (b)", "``x `y` z``, then `w`", "`tests/test_x.py::test_y`"]
    assert _code_spans(cells[1]) == ["x `y` z", "w"]
    assert _matches("no checkpoint step 7 in ...; available: [2, 4]",
                    "no checkpoint step 7 in /a/b; available: [2, 4]")
    assert not _matches("no checkpoint step 7", "no checkpoint step 7 in /a/b")


def _bad_input_producers(root: pathlib.Path | None, data_dir: pathlib.Path | None,
                         shared: dict | None = None) -> dict:
    """row id -> a function returning ``(message the user gets, {actual text: as documented})``.

    A row whose bad input is ``--config.x=v ...`` (no producer of its own) is produced like the
    CLI does: ml_collections parses the overrides on configs/tiny.py (an unknown field and a wrong
    type end there), then ``train`` (which checks before compiling or writing).
    ``shared``: ``{"root": a directory kept for the module}``, where a checkpoint of a real train
    state is written once.
    """
    import errno

    def error_of(fn, *args, **kw) -> str:
        try:
            fn(*args, **kw)
        except Exception as e:  # noqa: BLE001
            return str(e)
        raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise")

    home = {str(root): "/home/me"} if root is not None else {}
    tiny = ROOT / "configs" / "tiny.py"

    def train(*overrides: str, config: pathlib.Path = tiny, workdir: str = "runs/x"):
        from absl import flags
        from ml_collections import config_flags

        from atdiff_jax.cli import unknown_override
        from atdiff_jax.train.loop import train
        argv = ["atdiff", "train", f"--config={config}", f"--config.data.data_dir={data_dir}",
                *overrides]   # (--workdir is passed to train below)
        message = unknown_override(argv)
        if message:
            return message, {f"{ROOT}{os.sep}": ""}
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                        sys_argv=argv)
        try:
            fv(argv)
        except flags.Error as e:
            return f"FATAL Flags parsing error: {e}", {}
        cwd = os.getcwd()
        os.chdir(root)
        try:
            return error_of(train, fv.config, workdir), home
        finally:
            os.chdir(cwd)

    def stand_in_run(steps=(2, 4)):
        from test_checkpoint import make_run
        return make_run(root / "runs" / "x", steps=steps)

    def micro_run():   # a real train state's checkpoint (compiles the init once per module)
        from test_checkpoint import micro_run as build
        if "micro_run" not in shared:
            shared["micro_run"] = build(shared["root"] / "micro")
        return shared["micro_run"]

    def uint16_images():
        from test_data import make_uint16_dataset
        name = make_uint16_dataset(root / "u16")
        message, _ = train(f"--config.data.dataset={name}",
                           f"--config.data.data_dir={root / 'u16'}",
                           "--config.train.global_batch_size=4")
        return message, {name: "my_dataset"}

    def not_prepared():
        message, _ = train(f"--config.data.data_dir={root / 'data'}")
        return message.splitlines()[0], home

    def no_checkpoint():
        from atdiff_jax.train.loop import restore_state
        return error_of(restore_state, str(root / "runs" / "x")), home

    def restore_step():
        from atdiff_jax.train.loop import restore_state
        return error_of(restore_state, str(stand_in_run()), 7), home

    def damaged(how):
        def produce():
            from test_checkpoint import damage, restore
            run = stand_in_run()
            damage(run / "checkpoints" / "4", how)
            return error_of(restore, run, 4), home
        return produce

    def disk_full():
        from etils import epath
        from test_checkpoint import CONFIG, stand_in_state

        from atdiff_jax.train import checkpoint as ckpt

        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
        manager = ckpt.create_manager(stand_in_run(), max_to_keep=2)
        try:
            with pytest.MonkeyPatch.context() as m:
                m.setattr(epath.Path, "write_text", full)
                return error_of(ckpt.save, manager, 6, stand_in_state(6), {"step": 6},
                                CONFIG), home
        finally:
            manager.close()

    def gs_without_credentials():
        from etils import epath
        from etils.epath import gpath
        from test_checkpoint import PermissionDeniedError

        from atdiff_jax.train import checkpoint as ckpt

        def no_credentials(original, path, *args, **kwargs):
            if os.fspath(path).startswith("gs://"):
                raise PermissionDeniedError("HTTP response code 401 (anonymous caller)")
            return original(path, *args, **kwargs)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(gpath, "_is_tf_installed", lambda: False)
            with epath.testing.mock_epath(exists=no_credentials):
                return error_of(ckpt.check_access, "gs://my-bucket/runs/x"), {}

    def wrong_pt_sha256():
        from atdiff_jax.convert import load_torch_state_dict
        pt = root / "model.pt"
        pt.write_bytes(b"not a checkpoint\n")
        return error_of(load_torch_state_dict, pt, sha256="0" * 64), home

    def wrong_inception_sha256():
        from atdiff_jax.convert.inception import load_inception_params
        path = root / "inception.msgpack"
        path.write_bytes(b"not the weights")
        return error_of(load_inception_params, path, sha256="0" * 64), home

    def no_teacher():
        c = ROOT / "configs" / "mnist_cd_at.py"
        return train("--config.teacher.workdir=runs/mnist_adm", config=c)

    def ema_rate():
        from atdiff_jax.train.loop import restore_for_sampling
        return error_of(restore_for_sampling, str(micro_run()), ema_rate=0.5), {}

    def evaluate(**kw):
        def produce():
            from atdiff_jax.eval import report
            workdir = str(micro_run()) if kw.get("metrics") else str(root / "runs" / "x")
            return error_of(report.evaluate_workdir, workdir, **kw), {}
        return produce

    def classifier(images):
        def produce():
            from atdiff_jax.eval.mnist_fd import classifier_features
            return error_of(classifier_features, images), {}
        return produce

    special = {
        "a dataset of 16-bit images": uint16_images,
        "the dataset is not prepared in `--config.data.data_dir`": not_prepared,
        "a workdir without checkpoints (`atdiff sample`, `atdiff eval`)": no_checkpoint,
        "`--restore_step=7`, not a checkpoint of the run": restore_step,
        "a corrupt checkpoint (its array files overwritten)": damaged("corrupt"),
        "a truncated checkpoint (its array files cut short)": damaged("truncate"),
        "the disk fills up during a checkpoint write": disk_full,
        "a `gs://` workdir without Google Cloud credentials": gs_without_credentials,
        "a wrong `--config.init.checkpoint_sha256` (or `unet_from_checkpoint(..., sha256=...)`)":
            wrong_pt_sha256,
        "Inception weights that do not match their sha256 (`atdiff eval --metrics=fid`)":
            wrong_inception_sha256,
        "`--config.teacher.workdir=runs/mnist_adm` without checkpoints (distillation)": no_teacher,
        "`atdiff sample --ema_rate=0.5`, a rate the run does not keep": ema_rate,
        "`--samplers=heun` for `atdiff eval`": evaluate(samplers=("heun",)),
        "`--nfe=0` for `atdiff eval`": evaluate(nfes=(0,)),
        "`atdiff eval --metrics=fid` without converted Inception weights":
            evaluate(metrics=("fid",), inception="weights/inception.msgpack"),
        "NaN images given to `mnist_feature_distance` / `classifier_features`":
            classifier(np.full((2, 32, 32, 1), np.nan, np.float32)),
        "int32 images given to `classifier_features` (wrong dtype)":
            classifier(np.zeros((2, 32, 32, 1), np.int32)),
    }
    out = {}
    for r in bad_input_rows():
        if r.bad_input in special:
            out[r.id] = special.pop(r.bad_input)
        elif r.bad_input.startswith("`--config."):
            row_overrides = tuple(_code_spans(r.bad_input)[0].split())

            def produce(overrides=row_overrides):
                import jax
                message, placeholders = train(*overrides)
                if any(o.startswith("--config.mesh.") for o in overrides):
                    placeholders = {**placeholders, f"({jax.device_count()})": "(1)"}
                return message, placeholders
            out[r.id] = produce
    assert not special, f"producers for rows not in the table: {sorted(special)}"
    return out


@pytest.fixture(scope="module")
def bad_input_shared(tmp_path_factory, prepared):
    return {"root": tmp_path_factory.mktemp("bad_input"), "data_dir": prepared / "data"}


@pytest.mark.parametrize("row", bad_input_rows(), ids=lambda r: r.id)
def test_bad_input_table(row, bad_input_shared, tmp_path):
    """Each row of the table: the bad input, given as the table says, gives the quoted message."""
    producers = _bad_input_producers(tmp_path, bad_input_shared["data_dir"], bad_input_shared)
    if row.id not in producers:
        pytest.skip("checked as text by test_bad_input_table_is_complete_and_names_existing_tests")
    message, placeholders = producers[row.id]()
    for actual, shown in placeholders.items():
        message = message.replace(actual, shown)
    assert row.quoted and _matches(row.message, message), (
        f"docs/troubleshooting.md:{row.line}: the code says\n{message}")


# --------------------------------------------------------------------------------------------
# 5. running the user guide's commands in a temporary project

# configs/tiny.py's sizes, applied on top of every repository config in the temporary project
SHRINK = {
    "model.image_size": 16, "model.num_channels": 32, "model.channel_mult": "1,2",
    "model.num_res_blocks": 1, "model.attention_resolutions": "8", "model.num_head_channels": 32,
    "model.dropout": 0.0, "diffusion.steps": 100, "train.global_batch_size": 8,
    "train.num_minibatches": 2, "train.log_every": 1, "train.checkpoint_every": 2,
    "train.sample_every": 0, "train.num_samples": 4, "train.sample_steps": 5,
}


def _tool_env(bin_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    """Environment with ``atdiff`` and ``python`` (this interpreter) first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, cmd in (("atdiff", f'exec "{sys.executable}" -m atdiff_jax.cli "$@"'),
                      ("python", f'exec "{sys.executable}" "$@"')):
        shim = bin_dir / name
        shim.write_text(f"#!/usr/bin/env bash\n{cmd}\n")
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ATDIFF_", "JAX_", "XLA_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               XLA_FLAGS=subprocess_xla_flags(),  # the docs' commands, checked for what they
               # write and print, not for the numbers of one compiled program
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _bash(text: str, cwd: pathlib.Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def make_project(root: pathlib.Path, **shrink) -> tuple[pathlib.Path, dict[str, str]]:
    """A directory where the docs' relative paths work: shrunk configs/, shims, a compile cache.

    ``shrink`` overrides entries of SHRINK (e.g. ``**{"diffusion.steps": 1000}``).
    """
    configs = root / "configs"
    configs.mkdir(parents=True)
    sizes = {**SHRINK, **shrink}
    for src in sorted((ROOT / "configs").glob("*.py")):
        (configs / src.name).write_text(
            f'"""{src.name} at the size of configs/tiny.py (tests/test_docs.py)."""\n'
            "import runpy\n\n"
            f"SHRINK = {sizes!r}\n\n\n"
            "def get_config():\n"
            f"    c = runpy.run_path({str(src)!r})['get_config']()\n"
            "    for path, value in SHRINK.items():\n"
            "        group, name = path.split('.')\n"
            "        c[group][name] = value\n"
            "    return c\n")
    env = _tool_env(root / ".bin", JAX_COMPILATION_CACHE_DIR=str(root / ".jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return root, env


def cheap(text: str, *, minibatches: int = 2, steps: int = 3, batch_size: int = 4) -> str:
    """The docs' commands at test size (see the module docstring)."""
    lines = []
    for line in logical_lines(text):
        line = re.sub(r"--config\.train\.num_minibatches=\S+",
                      f"--config.train.num_minibatches={minibatches}", line)
        line = re.sub(r"(?<=\s)--num=\d+", "--num=4", line)
        line = re.sub(r"(?<=\s)--num_samples=\d+", "--num_samples=4", line)
        line = re.sub(r"(?<=\s)--nfe=[\d,]+", "--nfe=2", line)
        line = re.sub(r"(?<=\s)--steps=\d+", f"--steps={steps}", line)
        line = re.sub(r"(?<=\s)--batch_size=\d+", f"--batch_size={batch_size}", line)
        if re.search(r"\batdiff (sample|eval)\b", line) and "--batch_size" not in line:
            line += f" --batch_size={batch_size}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def run_blocks(test_name: str, cwd: pathlib.Path, env: dict[str, str], **cheap_kw
               ) -> list[subprocess.CompletedProcess]:
    """Runs the blocks marked with ``test_name`` (shell by bash, python by python), cheaply."""
    results = []
    for b in blocks_for(test_name):
        if b.lang == "python":
            script = cwd / f".block_{b.line}.py"
            script.write_text(b.text)
            res = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env,
                                 capture_output=True, text=True, timeout=TIMEOUT_S,
                                 check=False)
        else:
            res = _bash(cheap(b.text, **cheap_kw), cwd, env)
        assert res.returncode == 0, f"{b.where} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        results.append(res)
    return results


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("docs_project"))


@pytest.fixture(scope="module")
def prepared(project):
    root, env = project
    run_blocks("test_guide_prepare_data", root, env)
    return root


def test_guide_prepare_data(prepared):
    info = json.loads((prepared / "data" / "mnist32" / "1.0.0" / "dataset_info.json").read_text())
    sizes = {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]}
    assert sizes == {"train": 60000, "test": 10000}


@pytest.fixture(scope="module")
def trained(project, prepared):
    root, env = project
    (res,) = run_blocks("test_guide_train", root, env)
    return root / "runs" / "mnist_adm_at", res


def test_guide_train(trained):
    from atdiff_jax.train.loop import restore_state
    workdir, res = trained
    assert checkpoint_steps(workdir) == [2]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["image_size"] == 16 and saved["model"]["norm_groups"] == 8
    assert (saved["adv"]["kind"], saved["adv"]["steps"]) == ("fast", 3)  # mnist_adm_at.py
    assert list(workdir.glob("events.out.tfevents.*"))
    # fast AT: K = 3 optimizer updates per minibatch, none skipped
    state, _ = restore_state(str(workdir))
    assert (int(state.step), int(state.updates), int(state.skipped)) == (2, 6, 0)
    assert "optimizer_updates=6" in res.stderr


@pytest.fixture(scope="module")
def resumed(project, trained):
    root, env = project
    workdir, _ = trained
    (res,) = run_blocks("test_guide_resume", root, env, minibatches=3)
    return workdir, res


def test_guide_resume(resumed):
    """The guide's resume command continues the run (the same program: a compile-cache hit)."""
    from atdiff_jax.train.loop import restore_state
    workdir, res = resumed
    assert re.search(r"resumed from \S+/runs/mnist_adm_at/checkpoints step 2", res.stderr)
    assert checkpoint_steps(workdir) == [2, 3]
    state, config = restore_state(str(workdir))
    assert (int(state.step), int(state.updates), int(state.skipped)) == (3, 9, 0)
    assert config.train.num_minibatches == 3


@pytest.fixture(scope="module")
def sampled_and_evaluated(project, resumed):
    """The sampling and evaluation blocks, run at the same time (they only read the run)."""
    from concurrent.futures import ThreadPoolExecutor
    root, env = project
    with ThreadPoolExecutor(2) as pool:
        sample = pool.submit(run_blocks, "test_guide_sample", root, env)
        evaluate = pool.submit(run_blocks, "test_guide_eval_fd_mnist", root, env)
        return resumed[0], sample.result(), evaluate.result()


def test_guide_sample(sampled_and_evaluated):
    workdir, (res,), _ = sampled_and_evaluated
    with np.load(workdir / "samples" / "ddim3.npz") as f:
        images = f["images"]
    assert images.shape == (4, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
    assert (workdir / "samples" / "ddim3.png").stat().st_size > 100
    assert "wrote 4 samples" in res.stdout


def test_guide_eval_fd_mnist(sampled_and_evaluated):
    workdir, _, _ = sampled_and_evaluated
    results = json.loads((workdir / "eval" / "3" / "results.json").read_text())
    cells = {(r["sampler"], r["nfe"]): r for res in results for r in res["rows"]}
    assert set(cells) == {("ddim", 2), ("dpm_solver", 2)}
    for r in cells.values():  # 3 minibatches of a tiny model: far from MNIST, but finite
        assert np.isfinite(r["fd_mnist"]) and r["fd_mnist"] > 1 and 0 < r["confidence"] <= 1
    md = (workdir / "eval" / "3" / "report.md").read_text()
    assert "## MNIST feature distance" in md and "| ddim | mnist_adm_at |" in md


def test_guide_device_check(tmp_path):
    (res,) = run_blocks("test_guide_device_check", tmp_path, _tool_env(tmp_path / "bin"))
    assert "CpuDevice" in res.stdout


def test_pytest_commands_collect(tmp_path):
    """The docs' test commands, collect-only on this file: the slow marker selects as documented."""
    (block,) = blocks_for("test_pytest_commands_collect")
    commands = [c for c in simple_commands(block.text) if c[:3] == ["python", "-m", "pytest"]]
    assert len(commands) == 2
    env = _tool_env(tmp_path / "bin")
    selected = []
    for cmd in commands:
        res = subprocess.run([sys.executable, *cmd[1:], "--collect-only", "-p", "no:cacheprovider",
                              THIS], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300, check=False)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        selected.append({ln.split("::")[1] for ln in res.stdout.splitlines() if "::" in ln})
    default, slow = selected
    assert "test_guide_sample" in default and "test_local_sh_main_job" not in default
    assert "test_local_sh_main_job" in slow and "test_guide_sample" not in slow


def test_xla_flags_follow_the_suite_compile_level():
    """Run by test_suite_compile_level_switch in both settings (and here in this run's)."""
    from conftest import FAST_COMPILE
    fast = os.environ.get("ATDIFF_TESTS_XLA_OPT", "fast") == "fast"
    assert (FAST_COMPILE in os.environ.get("XLA_FLAGS", "")) == fast


def test_suite_compile_level_switch(tmp_path):
    """docs/testing.md's ATDIFF_TESTS_XLA_OPT=default command keeps XLA's default level (the
    caller's XLA_FLAGS only), the plain suite appends FAST_COMPILE after the caller's flags, and
    any other value is one usage error."""
    (block,) = blocks_for("test_suite_compile_level_switch")
    words = _words(logical_lines(block.text)[0])
    assignments = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    assert assignments == {"ATDIFF_TESTS_XLA_OPT": "default"}
    (cmd,) = simple_commands(block.text)
    assert cmd[:3] == ["python", "-m", "pytest"]
    probe = f"{THIS}::test_xla_flags_follow_the_suite_compile_level"
    for extra, code in ((assignments, 0), ({}, 0), ({"ATDIFF_TESTS_XLA_OPT": "O3"}, 4)):
        env = _tool_env(tmp_path / "bin", XLA_FLAGS="--xla_cpu_max_isa=AVX2", **extra)
        res = subprocess.run([sys.executable, *cmd[1:], "-p", "no:cacheprovider", probe],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                             check=False)
        assert res.returncode == code, (extra, res.stdout[-2000:] + res.stderr[-2000:])
    assert "ATDIFF_TESTS_XLA_OPT must be 'fast' or 'default', got 'O3'" in res.stderr + res.stdout


# --------------------------------------------------------------------------------------------
# 6. launch scripts with the cluster tools replaced by recorders


def _recorder(bin_dir: pathlib.Path, name: str, log: pathlib.Path, then: str = "") -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    tool = bin_dir / name
    tool.write_text("#!/usr/bin/env bash\n"
                    f'printf "%s\\0" "{name}" "$@" >> "{log}"\nprintf "\\n" >> "{log}"\n{then}\n')
    tool.chmod(0o755)


def _recorded(log: pathlib.Path) -> list[list[str]]:
    return [rec.rstrip("\0").split("\0") for rec in log.read_text().split("\0\n") if rec]


def _atdiff_in(script: str) -> list[str]:
    """The argv (after 'atdiff') of the one atdiff command in a shell script."""
    cmds = [c for c in simple_commands(script) if c[0] == "atdiff"]
    assert len(cmds) == 1, cmds
    return cmds[0][1:]


def test_tpu_pod_launch_dry_run(tmp_path):
    (block,) = blocks_for("test_tpu_pod_launch_dry_run")
    log = tmp_path / "calls"
    _recorder(tmp_path / "bin", "gcloud", log)
    res = _bash(block.text, ROOT, _tool_env(tmp_path / "bin"))
    assert res.returncode == 0, res.stderr
    (call,) = _recorded(log)
    assert call[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and call[5] == "my-pod"
    assert "--worker=all" in call and "--zone=us-central2-b" in call
    (remote,) = [a[len("--command="):] for a in call if a.startswith("--command=")]
    assert "git clone https://github.com/my-org/atdiff_jax.git atdiff_jax" in remote
    assert "'jax[tpu]'" in remote
    argv = _atdiff_in(remote)
    assert argv[:2] == ["train", "--distributed"]
    assert "--workdir=/mnt/shared/runs/cifar10_at" in argv
    assert "--config.data.data_dir=/mnt/shared/tfds" in argv
    assert "--config.init.checkpoint=/mnt/shared/ckpt/model250000.pt" in argv
    assert not check_atdiff_command(argv) and validate_train_command(argv) is None


def test_gpu_slurm_launch_dry_run(tmp_path):
    (block,) = blocks_for("test_gpu_slurm_launch_dry_run")
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    log = tmp_path / "calls"
    # sbatch: record, then run the batch script as SLURM would on the first node
    _recorder(tmp_path / "bin", "sbatch", log,
              then=f'export SLURM_SUBMIT_DIR="{submit}"\n'
                   'while [[ "$1" == --* ]]; do shift; done\nexec bash "$@"')
    _recorder(tmp_path / "bin", "srun", log)
    res = _bash(block.text, ROOT, _tool_env(tmp_path / "bin"))
    assert res.returncode == 0, res.stderr
    sbatch, srun = _recorded(log)
    assert sbatch[:4] == ["sbatch", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"]
    assert srun[:4] == ["srun", "atdiff", "train", "--distributed"]
    argv = srun[2:]
    assert "--config=configs/cifar10_adm_at.py" in argv
    assert "--workdir=/shared/runs/cifar10_at" in argv
    assert "--config.data.data_dir=/shared/tfds" in argv
    assert "--config.init.ema_checkpoint=/shared/ckpt/ema_0.9999_250000.pt" in argv
    assert not check_atdiff_command(argv) and validate_train_command(argv) is None


# --------------------------------------------------------------------------------------------
# 7. slow: the main job, fine-tuning, 8 devices


@pytest.mark.slow  # ~3-6 min on 2 CPU cores: two trainings, 64 DDIM-50 samples, 500-sample evals
def test_local_sh_main_job(tmp_path):
    """launch/local.sh as documented, in a copy of the repository layout with shrunk configs and
    an existing virtualenv (the script then skips the installation)."""
    root, env = make_project(tmp_path / "root")
    (root / "launch").mkdir()
    shutil.copy(ROOT / "launch" / "local.sh", root / "launch" / "local.sh")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    shutil.copy(root / ".bin" / "atdiff", venv_bin / "atdiff")
    (venv_bin / "activate").write_text('export PATH="$PWD/.venv/bin:$PATH"\n')
    results = run_blocks("test_local_sh_main_job", root, env)
    assert len(results) == 2
    with np.load(root / "runs" / "mnist_adm_at" / "samples" / "ddim50.npz") as f:
        assert f["images"].shape == (64, 16, 16, 1)
    for run in ("mnist_adm_at", "clean"):
        md = (root / "runs" / run / "eval" / "latest" / "report.md").read_text()
        assert "## MNIST feature distance" in md and "| ddim |" in md
        assert checkpoint_steps(root / "runs" / run) == [2]
        assert "sample quality:" in results[0].stdout
    assert json.loads((root / "runs" / "clean" / "config.json").read_text())["adv"]["kind"] == "none"


@pytest.mark.slow  # ~2-4 min: two short trainings
def test_finetune_walkthrough(tmp_path):
    import jax

    from atdiff_jax.train.loop import restore_state
    from atdiff_jax.train.state import ema_key
    root, env = make_project(tmp_path / "root")
    results = run_blocks("test_finetune_walkthrough", root, env)
    log = results[-1].stderr
    assert ("initialised from runs/mnist_adm.pt (EMA from runs/mnist_adm_ema.pt); optimizer "
            "state fresh") in log
    src, _ = restore_state(str(root / "runs" / "mnist_adm"))
    ft, ft_config = restore_state(str(root / "runs" / "mnist_ft_at"))
    assert (int(ft.step), int(ft.updates)) == (2, 6) and ft_config.adv.kind == "fast"

    def leaves(tree):
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])

    p_src, p_ft = leaves(src.params), leaves(ft.params)
    # 6 AdamW updates in the warm-up (lr <= 2e-3 * 6/50) move each weight by well under 1e-2;
    # a fresh initialisation would differ by far more
    assert 0 < np.max(np.abs(p_ft - p_src)) < 1e-2
    rate = ft_config.train.ema_rates[0]
    e_src, e_ft = leaves(src.ema[ema_key(rate)]), leaves(ft.ema[ema_key(rate)])
    # the EMA continued from the exported EMA (here close to the params: the source run is short;
    # tests/test_train_step.py checks that init.ema_checkpoint is loaded exactly)
    assert 0 < np.max(np.abs(e_ft - e_src)) < 1e-2
    # a wrong sha256 stops the run before anything is written
    bad = _bash("atdiff train --config=configs/mnist_adm_at.py --workdir=runs/bad "
                "--config.data.data_dir=data --config.init.checkpoint=runs/mnist_adm.pt "
                f"--config.init.checkpoint_sha256={'0' * 64}", root, env)
    assert bad.returncode != 0 and "SHA-256 is" in bad.stderr
    assert not (root / "runs" / "bad" / "checkpoints").exists() or not checkpoint_steps(
        root / "runs" / "bad")
    digest = hashlib.sha256((root / "runs" / "mnist_adm.pt").read_bytes()).hexdigest()
    assert ft_config.init.checkpoint_sha256 == digest


@pytest.mark.slow  # ~1-2 min: compiles the train step for 8 devices
def test_scale_resume_on_eight_devices(project, sampled_and_evaluated):
    """scale.md: the guide's run (written on 1 device) continues on 8 devices, FSDP over 4."""
    from atdiff_jax.train.loop import restore_state
    root, env = project
    workdir = sampled_and_evaluated[0]
    (res,) = run_blocks("test_scale_resume_on_eight_devices", root, env, minibatches=4)
    assert re.search(r"resumed from \S+ step 3", res.stderr)
    assert checkpoint_steps(workdir)[-1] == 4
    state, config = restore_state(str(workdir))
    assert (int(state.step), int(state.updates), int(state.skipped)) == (4, 12, 0)
    assert config.mesh.fsdp == 4
