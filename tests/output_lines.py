"""What the CLI prints, read as a user or a CI log would: helpers shared by the CLI tests."""


def error_line(stderr: str) -> str:
    """The one error line of a failed run: the last line of stderr, and the only one starting with
    'error:' (the plan and progress lines of a run that had started writing may come before it)."""
    lines = stderr.strip().splitlines()
    assert lines and [line for line in lines if line.startswith("error:")] == [lines[-1]], stderr
    assert "Traceback" not in stderr
    return lines[-1]
