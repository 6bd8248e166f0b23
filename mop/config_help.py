"""`mop train --help`: every option, generated from the configuration dataclasses.

Each option's help is the comment on its field: the trailing comment, or else the comment lines
just above it (the style the config dataclasses are written in), read with `ast` and `tokenize`
from the class source. A field without one fails `tests/test_config.py`, so the help cannot fall
behind the code.

Why not `tyro` (what torchtitan uses): it was tried. It keeps `--a.b.c=value`, but it has no place
for a TOML file under the command line nor for `model.shape`, whose named shape sets the other
model fields' defaults before the overrides; and its errors are multi-line boxes that exit the
process, where mop gives one line, exit code 2, and the new name of a moved option.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize

from mop.config import JobConfig, _is_section, _type_name, field_types

@functools.cache
def field_help(cls) -> dict[str, str]:
    """{field name: its comment} for the dataclass `cls` (trailing comment, else the block above)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if trailing:
            out[node.target.id] = " ".join(trailing)
            continue
        above, n = [], node.lineno - 1
        while n in comments and lines[n - 1].lstrip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        if above:
            out[node.target.id] = " ".join(above)
    return out


def option_help(cls, name: str) -> str:
    """One option's help text ('' when its field has no comment)."""
    return field_help(cls).get(name, "")


def options(job: JobConfig | None = None):
    """(path, type name, default, help) of every option; defaults are `job`'s (the built-in ones)."""
    job = job or JobConfig()

    def walk(obj, prefix):
        for name, typ in field_types(type(obj)).items():
            value = getattr(obj, name)
            if _is_section(typ):
                yield from walk(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", _type_name(typ), value, option_help(type(obj), name)

    yield from walk(job, "")


def _section_titles(cls, prefix: str = "") -> dict[str, str]:
    """{"parallel.experts": first line of its dataclass docstring, ...} for every section."""
    out = {}
    for name, typ in field_types(cls).items():
        if _is_section(typ):
            out[f"{prefix}{name}"] = (inspect.getdoc(typ) or "").split("\n")[0]
            out.update(_section_titles(typ, f"{prefix}{name}."))
    return out


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)


def render_options(job: JobConfig | None = None, width: int = 100) -> str:
    """The options part of `mop train --help`: per section, each option's path, type, default and help."""
    titles = _section_titles(JobConfig)
    out = ["options (--section.key=value on the command line; key = value under [section] in a TOML file;",
           "model.* defaults are those of the named model.shape):"]
    section = None
    for path, typ, default, text in options(job):
        here = path.rsplit(".", 1)[0]
        if here != section:
            section = here
            out += ["", f"  [{section}]  {titles.get(section, '')}".rstrip()]
        out.append(f"  --{path}  {typ}  (default: {_show(default)})")
        if text:
            out += textwrap.wrap(text, width=width, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(out)
