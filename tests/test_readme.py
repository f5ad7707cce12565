"""The front page (README.md) stays a short, true front page, and the library's snippets run.

* README.md has at most 150 lines; everything else lives in docs/ (docs/index.md).
* Its commands are the tested ones: the main job is the block of docs/guide.md that
  ``tests/test_docs.py::test_local_sh_main_job`` runs, the set-up and test command is what
  ``.ci/run`` runs, its pytest command is the one ``test_pytest_commands_collect`` collects, and
  the portability check is docs/testing.md's.
* Its results table is a cut of docs/RESULTS.md's fd_mnist table (the experiment's report).
* The Python snippets of docs/library.md (once the README's) run as written, in order, sharing one
  namespace.
"""
import pathlib
import re
import shlex

from test_docs import parse_blocks

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LIBRARY = DOCS / "library.md"
MAX_LINES = 150


def _marked_blocks(path: pathlib.Path, test: str):
    """The blocks of ``path`` whose test marker names ``test`` (``file.py::name``)."""
    return [b for b in parse_blocks(path) if b.kind == "test"
            and any(f"{f}::{n}" == test for _, f, n in b.test_ids())]


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_library_python_snippets_run():
    blocks = _marked_blocks(LIBRARY, "tests/test_readme.py::test_library_python_snippets_run")
    assert len(blocks) >= 2
    assert all(b.lang == "python" for b in blocks)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.text, block.where, "exec"), namespace)  # noqa: S102
    # The snippets computed what they claim.
    assert namespace["g_delta"].shape == namespace["batch"]["x_start"].shape
    assert float(namespace["loss"]) > 0
    for name in ("ddim", "iddpm", "es", "dpm"):
        assert namespace[name].shape == (4, 16, 16, 3)


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_LINES}): move the details to docs/")
    assert not _readme_blocks("python"), "Python snippets belong in docs/library.md"


def _steps(command: str) -> list[list[str]]:
    """A one-line shell command -> the words of each ``&&`` step."""
    return [shlex.split(step) for step in command.strip().split(" && ")]


def _ci_steps() -> list[list[str]]:
    """The steps of .ci/run as a user would type them: $LOCK spelled out, pip's -q dropped,
    the pip self-upgrade left out (the README's command uses the pip the venv brings)."""
    steps, lock = [], None
    for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "set ", "cd ")):
            continue
        if line.startswith("LOCK="):
            lock = line.partition("=")[2]
            continue
        words = [lock if w == "$LOCK" else w for w in shlex.split(line)]
        if words[0] == "pip":
            if "--upgrade" in words:
                continue
            words = [w for w in words if w != "-q"]
        steps.append(words)
    return steps


def test_readme_commands_are_the_tested_ones():
    main_job, setup_and_test, portability = _readme_blocks("bash")
    # the main job: the guide's block that test_local_sh_main_job runs
    guide = _marked_blocks(DOCS / "guide.md", "tests/test_docs.py::test_local_sh_main_job")
    assert main_job.strip() == guide[0].text.strip() == "bash launch/local.sh"
    text = README.read_text(encoding="utf-8")
    assert f"`{guide[1].text.strip()}`" in text  # the example with a config and flags
    # set-up and tests: the steps of .ci/run, ending in the collected pytest command
    steps = _steps(setup_and_test)
    assert steps == _ci_steps()
    collected = _marked_blocks(DOCS / "testing.md",
                               "tests/test_docs.py::test_pytest_commands_collect")
    (block,) = collected
    assert shlex.split(block.text.splitlines()[0]) == steps[-1]
    # the portability check: docs/testing.md's, the same pytest command with reduced SIMD
    (documented,) = [b for b in parse_blocks(DOCS / "testing.md")
                     if "xla_cpu_max_isa" in b.text]
    assert portability.strip() == documented.text.strip()
    words = shlex.split(portability)
    assert words[:2] == ['NPY_DISABLE_CPU_FEATURES=X86_V4 AVX512_ICL AVX512_SPR',
                         "XLA_FLAGS=--xla_cpu_max_isa=AVX2"]
    assert words[2:] == steps[-1]


def _table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table whose header line starts with
    ``header``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def test_readme_results_table_is_the_experiments():
    header = "| sampler | arm | NFE 5 |"
    readme_head = next(ln for ln in README.read_text(encoding="utf-8").splitlines()
                       if ln.startswith(header))
    readme_nfes = re.findall(r"NFE (\d+)", readme_head)
    results_text = (DOCS / "RESULTS.md").read_text(encoding="utf-8")
    results_head = next(ln for ln in results_text.splitlines() if ln.startswith(header))
    column = {nfe: 2 + i for i, nfe in enumerate(re.findall(r"NFE (\d+)", results_head))}
    results = {(r[0], r[1]): r for r in _table(results_text, header)}
    rows = _table(README.read_text(encoding="utf-8"), header)
    assert len(rows) >= 5 and {"fast_at", "clean"} <= {r[1] for r in rows}
    for row in rows:
        assert (row[0], row[1]) in results, row
        full = results[(row[0], row[1])]
        assert row[2:] == [full[column[n]] for n in readme_nfes], (row, full)
