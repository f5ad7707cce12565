"""Writes docs/configuration.md, the configuration reference, from configs/default.py.

Every option of ``get_config()`` is listed with its default (the literal as written in
configs/default.py, checked against the value ``get_config()`` returns) and its meaning, taken from
the comments of configs/default.py:

* a trailing comment on the option's line, continued by comment-only lines indented past the code
  that follow it, is the option's meaning;
* a comment-only line at the code's indentation (not a continuation) starts a note that is printed
  as a paragraph before the options that follow it;
* a ``# ----- title`` line starts a section.

Usage (from the repository root)::

    python docs/gen_config_reference.py            # (re)writes docs/configuration.md
    python docs/gen_config_reference.py --check    # exit 1 if docs/configuration.md is stale

tests/test_docs.py fails when docs/configuration.md differs from what this script writes.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import pathlib
import re
import runpy
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.py"
OUTPUT = ROOT / "docs" / "configuration.md"

_SECTION = re.compile(r"^#\s*-{3,}\s*(.*?)\s*$")


@dataclasses.dataclass
class Option:
    path: str          # "train.global_batch_size"
    default: str       # the literal as written in default.py, e.g. "100_000"
    value: object      # the value get_config() returns
    meaning: list[str]


@dataclasses.dataclass
class Note:
    lines: list[str]


@dataclasses.dataclass
class Section:
    title: str
    group: str = ""    # the ConfigDict it creates ("data", "cm.lcm"); "" for top-level options


def flatten(config, prefix: str = "") -> dict[str, object]:
    """``{"a.b.c": value}`` for every leaf of a ConfigDict (tuples are leaves)."""
    out = {}
    for key in config:
        value = config[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys") and hasattr(value, "items"):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _comments(source: str) -> dict[int, tuple[int, str]]:
    """line number -> (column, text without '#') of every comment."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string[1:].strip())
    return out


def _is_config_dict(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            == "ConfigDict")


def parse(path: pathlib.Path = DEFAULT_CONFIG) -> list:
    """The reference as a list of Section / Note / Option entries, in source order."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    comments = _comments(source)
    values = flatten(runpy.run_path(str(path))["get_config"]())
    func = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "get_config")
    body = [n for n in func.body if isinstance(n, ast.Assign)]
    alias: dict[str, str] = {}          # local name -> group path ("" for the root)
    entries: list = [Section("top level")]
    statements = {n.lineno: n for n in body}
    code_lines = {ln for n in body for ln in range(n.lineno, n.end_lineno + 1)}
    last_option: Option | None = None
    last_option_col = 0
    seen: set[str] = set()

    def group_of(target: ast.AST) -> str | None:
        if isinstance(target, ast.Name):
            return alias.get(target.id)
        if isinstance(target, ast.Attribute):
            parent = group_of(target.value)
            return None if parent is None else (f"{parent}.{target.attr}" if parent
                                                else target.attr)
        return None

    first = func.body[0].lineno
    for lineno in range(first, func.end_lineno + 1):
        text = lines[lineno - 1]
        if lineno in statements:
            node = statements[lineno]
            if _is_config_dict(node.value):
                group = None
                for t in node.targets:
                    if isinstance(t, ast.Attribute):
                        group = group_of(t)
                group = group if group is not None else ""
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        alias[t.id] = group
                if group:
                    # a "# ----- title" header (perhaps followed by notes) names this group;
                    # otherwise (a nested group) it gets a heading of its own, above its notes
                    k = len(entries) - 1
                    while k > 0 and isinstance(entries[k], Note):
                        k -= 1
                    if isinstance(entries[k], Section) and not entries[k].group:
                        entries[k].group = group
                    else:
                        k = len(entries)
                        while isinstance(entries[k - 1], Note):
                            k -= 1
                        entries.insert(k, Section(group, group))
                last_option = None
                continue
            paths = [group_of(t.value) for t in node.targets if isinstance(t, ast.Attribute)]
            names = [t.attr for t in node.targets if isinstance(t, ast.Attribute)]
            literal = ast.get_source_segment(source, node.value)
            meaning = []
            for ln in range(node.lineno, node.end_lineno + 1):
                if ln in comments:
                    meaning.append(comments[ln][1])
            for parent, name in zip(paths, names):
                if parent is None:
                    raise ValueError(f"{path}:{lineno}: cannot resolve the group of {name!r}")
                full = f"{parent}.{name}" if parent else name
                if full not in values:
                    raise ValueError(f"{path}:{lineno}: {full} is not a leaf of get_config()")
                try:
                    same = ast.literal_eval(literal) == values[full]
                except ValueError:
                    same = False
                default = literal if same else repr(values[full])
                last_option = Option(full, default, values[full], list(meaning))
                last_option_col = node.col_offset
                entries.append(last_option)
                seen.add(full)
            continue
        if lineno in code_lines:
            continue
        stripped = text.strip()
        if not stripped:
            last_option = None
            continue
        if lineno not in comments:
            continue
        col, comment = comments[lineno]
        header = _SECTION.match(stripped)
        if header:
            entries.append(Section(header.group(1)))
            last_option = None
        elif last_option is not None and col > last_option_col:
            last_option.meaning.append(comment)        # continuation of a trailing comment
        else:
            last_option = None
            if entries and isinstance(entries[-1], Note):
                entries[-1].lines.append(comment)
            else:
                entries.append(Note([comment]))
    missing = sorted(set(values) - seen)
    if missing:
        raise ValueError(f"{path}: options set outside plain assignments: {missing}")
    return entries


def _markdown(text: str) -> str:
    """Comment text as Markdown: `code spans` kept; elsewhere <, > and * are shown literally."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = (parts[i].replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;"))
    return "`".join(parts)


def _cell(text: str) -> str:
    """Text for a table cell (GFM: a pipe must be escaped, also inside code spans)."""
    return text.replace("|", "\\|")


def render(entries: list, source_name: str = "configs/default.py") -> str:
    out = [
        "# Configuration reference",
        "",
        (f"<!-- Generated by `python docs/gen_config_reference.py` from {source_name}; do not "
         "edit by hand. tests/test_docs.py fails when this file is out of date. -->"),
        "",
        (f"Every option of `atdiff train`, with its default in `{source_name}` and its meaning "
         "(the comments of that file). Experiment configs (`configs/*.py`) start from these "
         "defaults and change some of them; any option can be changed on the command line with "
         "`--config.<option>=<value>`, e.g. `--config.adv.steps=5` or "
         "`--config.train.ema_rates=0.999,0.9999`. A value must have the default's type (an "
         "integer option rejects `1.5`). Values are checked when a run starts, before anything is "
         "written: a bad one stops it with the option's name and the allowed values (see "
         "[troubleshooting](troubleshooting.md)). A run writes the config it used to "
         "`<workdir>/config.json` and into every checkpoint."),
        "",
    ]
    table_open = False
    for e in entries:
        if isinstance(e, Section):
            level = "###" if "." in e.group else "##"
            out += ["", f"{level} {e.title}", ""]
            if e.group:
                out += [f"Options `{e.group}.*`.", ""]
            table_open = False
        elif isinstance(e, Note):
            out += ["", _markdown(" ".join(e.lines)), ""]
            table_open = False
        else:
            if not table_open:
                out += ["| option | default | meaning |", "|---|---|---|"]
                table_open = True
            meaning = _cell(_markdown(" ".join(e.meaning)))
            out.append(f"| `{e.path}` | `{_cell(e.default)}` | {meaning} |")
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def generate(path: pathlib.Path = DEFAULT_CONFIG) -> str:
    return render(parse(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file differs from the generated text")
    parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=pathlib.Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = generate(args.config)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date with {args.config}: run "
                  "python docs/gen_config_reference.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
