#!/usr/bin/env python3
"""Fails when a Rust file is over 700 lines or a Rust function is over 80 lines.

Usage: scripts/check-sizes.py [DIR ...]   (default: the crates, benches, fuzz and examples)

The size rule of ARCHITECTURE.md, held for the library crates, their tests and examples, the
benches, the fuzz targets and the firmware example alike. A function's size is counted from
the line of its `fn` keyword to the line of its closing brace, matched brace by brace with
comments, string and char literals left out (so a `{` in a string or a comment does not
count). Declarations without a body (`fn f();` in a trait or an `extern` block) have no size.
Functions written by a `macro_rules!` body count like any other (`fn $name(..) {..}`).

Exemptions are named in EXEMPT below, each with the reason a split would hurt; keep the list
empty where possible.
"""

import os
import re
import sys

from rust_source import strip

MAX_FILE_LINES = 700
MAX_FN_LINES = 80
DIRS = ["lamb-core", "lamb-std", "lamb-candle", "lamb-mpi", "benches", "fuzz", "examples"]
SKIP_DIRS = {"target", ".git", "corpus", "artifacts"}

# "path/to/file.rs::function" -> why the function stays whole. Keep empty where possible.
EXEMPT = {}

FN = re.compile(r"\bfn\s+(\$?\w+)")


def functions(code):
    """Yields (name, first line, last line) of every function with a body in stripped code."""
    line_starts = [0] + [i + 1 for i, c in enumerate(code) if c == "\n"]

    def line_of(pos):
        lo, hi = 0, len(line_starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if line_starts[mid] <= pos:
                lo = mid
            else:
                hi = mid - 1
        return lo + 1

    for m in FN.finditer(code):
        # The body starts at the first `{` outside the signature's () and [] (which may hold
        # `;` in array types); a `;` first means a declaration without a body.
        depth, j = 0, m.end()
        while j < len(code):
            c = code[j]
            if c in "([":
                depth += 1
            elif c in ")]":
                depth -= 1
            elif depth == 0 and c in "{;":
                break
            j += 1
        if j >= len(code) or code[j] == ";":
            continue
        braces, k = 0, j
        while k < len(code):
            if code[k] == "{":
                braces += 1
            elif code[k] == "}":
                braces -= 1
                if braces == 0:
                    break
            k += 1
        yield m.group(1), line_of(m.start()), line_of(k)


def rust_files(root, dirs):
    for d in dirs:
        for base, subdirs, files in os.walk(os.path.join(root, d)):
            subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS)
            for f in sorted(files):
                if f.endswith(".rs"):
                    yield os.path.join(base, f)


def main(args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems, files, fns = [], 0, 0
    for path in rust_files(root, args or DIRS):
        rel = os.path.relpath(path, root)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        files += 1
        lines = text.count("\n") + (not text.endswith("\n") and bool(text))
        if lines > MAX_FILE_LINES and rel not in EXEMPT:
            problems.append(f"{rel}: {lines} lines (at most {MAX_FILE_LINES})")
        for name, first, last in functions(strip(text)):
            fns += 1
            size = last - first + 1
            if size > MAX_FN_LINES and f"{rel}::{name}" not in EXEMPT:
                problems.append(f"{rel}:{first}: fn {name} is {size} lines (at most {MAX_FN_LINES})")
    for p in problems:
        print(p)
    verdict = f"{len(problems)} over the limits" if problems else "all within the limits"
    print(f"{files} files, {fns} functions: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
