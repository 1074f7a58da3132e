"""What the CLI prints, read as a user or a CI log would: helpers shared by the CLI tests."""


def error_line(stderr: str) -> str:
    """The one error line of a failed run: the last line of stderr, and the only one starting with
    'error:' (the plan and progress lines of a run that had started writing may come before it)."""
    lines = stderr.strip().splitlines()
    assert lines and [line for line in lines if line.startswith("error:")] == [lines[-1]], stderr
    assert "Traceback" not in stderr
    return lines[-1]


def table_keys(text: str, header: str = "key ") -> list[str]:
    """The whole keys of the first key table in `text` (from its header line to the first blank line),
    rebuilt from a tree layout too: a line holding only a key ending in '.' is a heading, and the
    lines indented under it continue it. Asserts no key was cut ('…')."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    keys, stack = [], []
    for line in lines[start:]:
        if not line.strip() or line.startswith("("):  # the end, or the notes under the table
            break
        depth = (len(line) - len(line.lstrip(" "))) // 2
        words = line.split()
        assert "…" not in words[0], line
        del stack[depth:]
        if len(words) == 1 and words[0].endswith("."):
            stack.append(words[0])
        else:
            keys.append("".join(stack) + words[0])
    return keys
