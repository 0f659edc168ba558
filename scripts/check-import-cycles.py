#!/usr/bin/env python3
"""Fails when the files of a crate import each other in a circle.

Usage: scripts/check-import-cycles.py [CRATE_SRC_DIR ...]   (default: every */src with a lib.rs)

The layering rule of ARCHITECTURE.md: imports between the files of one crate point one way,
in the order the data moves. This script builds the file graph of each crate from the paths
its code names (`use crate::…`, `super::…`, `self::…`, `$crate::…` in macros, and paths
written inline in expressions), resolves each path to the file that *defines* the item
(following `pub use` re-exports, so naming `crate::Foo` re-exported by lib.rs points at
Foo's own file), and reports every strongly connected component of more than one file.

A module declaring its children (`mod x;`) is not an import, and neither is a module
re-exporting its own descendants (a facade such as lib.rs): those are what a module tree
is. Code under `#[cfg(test)]` counts like any other code.
"""

import os
import re
import sys

from rust_source import strip

PATH = re.compile(r"(?<![\w:])(\$?crate|super|self)((?:::(?:\w+|\{[^;]*?\}))+)", re.S)
USE = re.compile(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", re.S)
ANY_USE = re.compile(r"\buse\s+([^;]+);", re.S)
INLINE_MOD = re.compile(r"\bmod\s+(\w+)\s*\{")
MOD = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", re.M)


class Crate:
    def __init__(self, src):
        self.src = src
        self.files = {}  # module path tuple -> file
        self.texts = {}
        self._walk((), os.path.join(src, "lib.rs"))

    def _walk(self, mod, path):
        self.files[mod] = path
        with open(path, encoding="utf-8") as f:
            text = strip(f.read())
        self.texts[mod] = text
        base = os.path.dirname(path)
        if not (path.endswith("lib.rs") or path.endswith("mod.rs")):
            base = os.path.join(base, os.path.basename(path)[:-3])
        for child in MOD.findall(text):
            for cand in (os.path.join(base, child + ".rs"), os.path.join(base, child, "mod.rs")):
                if os.path.exists(cand):
                    self._walk(mod + (child,), cand)
                    break

    def reexports(self, mod):
        """name -> absolute path of each `pub use` of module `mod`."""
        names = {}
        for body in USE.findall(self.texts[mod]):
            for path in expand(body.replace("\n", " ")):
                parts = path.split("::")
                alias = parts[-1]
                if " as " in alias:
                    parts[-1], alias = [s.strip() for s in alias.split(" as ")]
                absolute = self.absolute(mod, parts)
                if absolute is not None and alias != "*":
                    names[alias] = absolute
        return names

    def absolute(self, mod, parts):
        head, rest = parts[0], parts[1:]
        if head in ("crate", "$crate"):
            return tuple(rest)
        if head == "self":
            return mod + tuple(rest)
        if (mod + (head,)) in self.files:
            return mod + (head,) + tuple(rest)  # a child module (`use dispatch::Backend`)
        if head == "super":
            base = mod[:-1]
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
            return base + tuple(rest)
        return None  # an external crate or a local name

    def resolve(self, path, seen=()):
        """The module that defines the item at absolute `path`."""
        mod = ()
        for i, name in enumerate(path):
            if mod + (name,) in self.files:
                mod = mod + (name,)
                continue
            target = self.reexports(mod).get(name)
            if target is not None and target not in seen:
                return self.resolve(target + tuple(path[i + 1 :]), seen + (target,))
            return mod
        return mod

    def segments(self):
        """(file's module, module the text is in, text) for each file and each inline
        `mod name { .. }` in it (where `super::` means the file's module)."""
        for mod, text in self.texts.items():
            inline = []
            for m in INLINE_MOD.finditer(text):
                depth, j = 0, m.end() - 1
                for j in range(m.end() - 1, len(text)):
                    depth += {"{": 1, "}": -1}.get(text[j], 0)
                    if depth == 0:
                        break
                inline.append((m.start(), j + 1, m.group(1)))
            outer, last = [], 0
            for start, end, name in inline:
                if start < last:
                    continue  # nested inside a previous inline module: one level is enough
                outer.append(text[last:start])
                yield mod, mod + (name,), text[start:end]
                last = end
            outer.append(text[last:])
            yield mod, mod, "".join(outer)

    def edges(self):
        graph = {m: set() for m in self.files}
        for file_mod, mod, text in self.segments():
            facade = set()
            for body in USE.findall(text):
                for path in expand(body.replace("\n", " ")):
                    absolute = self.absolute(mod, path.partition(" as ")[0].split("::"))
                    if absolute is not None:
                        facade.add(absolute)
            # Names a `use` brings in (`use crate::kernels::{arch, scalar};` makes
            # `arch::avx2::norms` a path into kernels/arch/avx2.rs), and the modules it declares
            # (`mod torch;` then `torch::load(..)` is a call into torch.rs).
            aliases = {child: mod + (child,) for child in MOD.findall(text)}
            for body in ANY_USE.findall(text):
                for path in expand(body.replace("\n", " ")):
                    head, _, alias = path.partition(" as ")
                    parts = head.split("::")
                    absolute = self.absolute(mod, parts)
                    if absolute is not None and parts[-1] not in ("*", "self"):
                        aliases[alias.strip() or parts[-1]] = absolute
            paths = [m.group(1) + m.group(2) for m in PATH.finditer(text)]
            if aliases:
                names = "|".join(sorted(map(re.escape, aliases), key=len, reverse=True))
                for m in re.finditer(rf"(?<![\w:$])({names})((?:::\w+)+)", text):
                    paths.append("::".join(("crate",) + aliases[m.group(1)]) + m.group(2))
            for p in paths:
                for path in expand(p):
                    parts = [p.split(" as ")[0].strip() for p in path.split("::")]
                    absolute = self.absolute(mod, parts)
                    if absolute is None:
                        continue
                    target = self.resolve(absolute)
                    if target == file_mod or target not in self.files:
                        continue
                    # A module re-exporting its own descendants is a facade, not an import.
                    if absolute in facade and target[: len(mod)] == mod:
                        continue
                    graph[file_mod].add(target)
        return graph


def expand(path):
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    path = re.sub(r"\s+", " ", path).strip().rstrip(":")
    i = path.find("{")
    if i < 0:
        head, _, alias = path.partition(" as ")
        head = head.replace(" ", "")
        return [f"{head} as {alias.strip()}" if alias else head]
    depth, j = 0, i
    for j in range(i, len(path)):
        depth += {"{": 1, "}": -1}.get(path[j], 0)
        if depth == 0:
            break
    prefix, inner = path[:i], path[i + 1 : j]
    items, depth, start = [], 0, 0
    for k, ch in enumerate(inner):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(inner[start:k])
            start = k + 1
    items.append(inner[start:])
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item == "self":
            out.append(prefix.rstrip(":"))
        else:
            out.extend(expand(prefix + item))
    return out


def cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    srcs = args or sorted(
        os.path.join(root, d, "src")
        for d in os.listdir(root)
        if os.path.exists(os.path.join(root, d, "src", "lib.rs"))
    )
    failed = False
    for src in srcs:
        crate = Crate(src)
        graph = crate.edges()
        name = os.path.relpath(os.path.dirname(src), root)
        found = cycles(graph)
        if not found:
            print(f"{name}: {len(graph)} files, no import cycle")
            continue
        failed = True
        for comp in found:
            files = [os.path.relpath(crate.files[m], root) for m in comp]
            print(f"{name}: import cycle between {len(files)} files:")
            for m in comp:
                outs = sorted(os.path.relpath(crate.files[t], root) for t in graph[m] if t in comp)
                print(f"    {os.path.relpath(crate.files[m], root)} -> {', '.join(outs)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
