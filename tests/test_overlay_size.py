"""Owned C++ stays in pieces a reader can hold: no function over 100 lines, no struct or class over 200
(issue 23). A brace-matching scan of the clang-formatted overlay, not a parser: comments, string and character
literals are blanked first; a block at declaration scope (file, namespace, struct) is a struct when its header
says struct/class/union, a function when its header ends with a parameter list (and qualifiers or a
constructor's initialiser list); blocks inside a function (lambdas, control flow) count as the function's lines.
Lines run from the header's first line to the closing brace, both included."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import patches

from conftest import REPO

MAX_FUNCTION_LINES = 100
MAX_STRUCT_LINES = 200


@dataclass(frozen=True)
class Block:
    kind: str  # "function" or "struct"
    name: str
    first: int  # 1-based line of the header's first line
    last: int  # 1-based line of the closing brace

    @property
    def lines(self) -> int:
        return self.last - self.first + 1


def blank_comments_and_literals(src: str) -> str:
    """The same text with comments, string and character literals (raw strings too) replaced by spaces, and
    preprocessor lines blanked; newlines are kept, so offsets and line numbers do not move."""
    out = list(src)
    i, n = 0, len(src)

    def blank(a: int, b: int) -> None:
        for j in range(a, min(b, n)):
            if out[j] != "\n":
                out[j] = " "

    at_line_start = True
    while i < n:
        c = src[i]
        if at_line_start and c == "#":
            # a preprocessor line (with its continuations)
            j = i
            while j < n and not (src[j] == "\n" and src[j - 1] != "\\"):
                j += 1
            blank(i, j)
            i = j
            continue
        if c == "\n":
            at_line_start = True
            i += 1
            continue
        if not c.isspace():
            at_line_start = False
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == "R" and src.startswith('R"', i) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'R"([^(\s]*)\(', src[i:])
            if m is None:
                i += 1
                continue
            end = src.find(")" + m.group(1) + '"', i + m.end())
            j = n if end < 0 else end + len(m.group(1)) + 2
            blank(i, j)
            i = j
        elif c in "\"'":
            if c == "'" and i > 0 and src[i - 1].isalnum() and i + 1 < n and src[i + 1].isalnum():
                i += 1  # a digit separator (1'000)
                continue
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


_CONTROL = re.compile(r"\b(if|for|while|switch|catch|do|else|try)\b")


def _header_name(header: str) -> str:
    m = re.search(r"([A-Za-z_~][\w:~]*(?:\s*operator\s*\S+)?)\s*\(", header)
    return m.group(1) if m else header.strip().split("\n")[-1].strip()[:60]


def scan(src: str) -> list[Block]:
    """Functions and structs of a C++ source (see the module docstring for what counts)."""
    text = blank_comments_and_literals(src)
    line_at = [0] * (len(text) + 1)
    line = 1
    for i, ch in enumerate(text):
        line_at[i] = line
        if ch == "\n":
            line += 1
    line_at[len(text)] = line
    blocks: list[Block] = []

    def match_brace(i: int) -> int:
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return j
        raise AssertionError(f"unbalanced braces from line {line_at[i]}")

    def walk(begin: int, end: int) -> None:
        """Declaration scope [begin, end): namespaces, structs, the file."""
        stmt = begin  # where the current declaration's text starts
        i = begin
        while i < end:
            ch = text[i]
            if ch in ";}":
                stmt = i + 1
                i += 1
                continue
            if ch == ":" and re.search(r"\b(public|private|protected)\s*$", text[stmt:i]):
                stmt = i + 1
                i += 1
                continue
            if ch != "{":
                i += 1
                continue
            close = match_brace(i)
            header = text[stmt:i]
            start = stmt + (len(header) - len(header.lstrip()))
            flat = " ".join(header.split())
            if re.search(r"\benum\b", flat):
                pass  # enum and enum class: a list of names
            elif re.search(r"\b(namespace|extern)\b", flat) and "(" not in flat:
                walk(i + 1, close)
            elif re.search(r"\b(struct|class|union)\b", flat) and "(" not in flat and "=" not in flat:
                name = re.findall(r"\b(?:struct|class|union)\s+(\w+)", flat)
                blocks.append(Block("struct", name[-1] if name else flat, line_at[start], line_at[close]))
                walk(i + 1, close)
            elif (
                not flat.endswith("=")
                and not _CONTROL.match(flat)
                and re.search(r"\)\s*(const|override|final|noexcept|mutable|->\s*[\w:<>*& ]+|\s)*$|\)\s*:\s*\S", flat)
            ):
                blocks.append(Block("function", _header_name(header), line_at[start], line_at[close]))
            i = close + 1
            stmt = i
            # a struct's closing `};` or a variable's `} name;` ends there
        return None

    walk(0, len(text))
    return blocks


def overlay_sources(root: Path = REPO) -> list[Path]:
    return sorted(
        patches.overlay_dir(root) / p for p in patches.overlay_files(root) if p.suffix in (".cpp", ".h", ".hpp")
    )


def test_scanner_finds_functions_structs_and_ignores_braces_in_comments_and_strings():
    src = '''
namespace {
// a comment with { braces
struct a {
    int x{ 0 };
    void f() const {
        auto l = [&] { return "}"; };
        if (x) {
        }
    }
  public:
    a() : x(1) {}
};
}
int g(int y) {
    /* } */
    char c = '{';
    return y;
}
enum e { one, two };
enum class f { three };
'''
    found = {(b.kind, b.name): b.lines for b in scan(src)}
    assert found == {("struct", "a"): 10, ("function", "f"): 5, ("function", "a"): 1, ("function", "g"): 5}


def test_no_overlay_function_over_100_lines_nor_struct_over_200():
    sources = overlay_sources()
    assert len(sources) >= 10
    too_long = []
    n_functions = 0
    for path in sources:
        for b in scan(path.read_text()):
            n_functions += b.kind == "function"
            limit = MAX_FUNCTION_LINES if b.kind == "function" else MAX_STRUCT_LINES
            if b.lines > limit:
                too_long.append(f"{path.name}:{b.first}: {b.kind} {b.name} is {b.lines} lines (limit {limit})")
    assert n_functions > 100, "the scanner found too few functions: is it still reading the overlay?"
    assert not too_long, "split these (issue 23):\n" + "\n".join(too_long)


if __name__ == "__main__":  # a report of the longest blocks: python tests/test_overlay_size.py
    rows = [(b.lines, p.name, b) for p in overlay_sources() for b in scan(p.read_text())]
    for lines, name, b in sorted(rows, key=lambda r: -r[0])[:25]:
        print(f"{lines:5d}  {b.kind:8s} {name}:{b.first} {b.name}")
    pytest.main([__file__, "-q"])
