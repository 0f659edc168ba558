"""Reading Rust source text for the repository's checks (scripts/check-*.py)."""

import re


def strip(text):
    """Blanks comments and string/char literals, keeping every newline (so line numbers hold)."""
    out, i, n = [], 0, len(text)

    def skip_to(j):
        # Keeps the newlines of the skipped text.
        out.append("\n" * text.count("\n", i, j))
        return j

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            i = skip_to(j)
        elif re.match(r'b?r#*"', text[i : i + 64]) and not re.match(r"\w", text[i - 1 : i] or " "):
            m = re.match(r'b?r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            i = skip_to(n if j < 0 else j + len(end))
            out.append('""')
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = skip_to(j + 1)
            out.append('""')
        elif c == "'" and re.match(r"'(\\(x\w\w|u\{\w+\}|.)|[^\\'])'", text[i : i + 12]):
            m = re.match(r"'(\\(x\w\w|u\{\w+\}|.)|[^\\'])'", text[i : i + 12])
            i += m.end()
            out.append("' '")
        else:
            out.append(c)
            i += 1
    return "".join(out)
