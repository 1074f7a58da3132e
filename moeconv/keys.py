"""Key helpers shared by every human view: collapse numeric path segments into ranges.

`model.layers.0.mlp.router.weight` .. `model.layers.23.mlp.router.weight` render as
`model.layers.{0...23}.mlp.router.weight` with a count of 24, as transformers' LOAD REPORT does.
"""

import re
from collections.abc import Iterable

# ASCII digits only: `\d` and str.isdigit also accept other scripts' digits and superscripts
# ('¹'), which int() rejects or reads as a number the key does not visibly contain.
_NUMERIC_SEGMENT = re.compile(r"(?<=\.)[0-9]+(?=\.|$)|^[0-9]+(?=\.)")
_DIGIT_RUN = re.compile(r"([0-9]+)")


def is_number(text: str) -> bool:
    """True for a plain ASCII decimal number such as `7` or `12`."""
    return bool(text) and text.isascii() and text.isdigit()


def natural_key(key: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`."""
    # re.split with one capture group alternates text, digits, text, ...: odd positions are numbers.
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGIT_RUN.split(key)))


def _render_indices(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}...{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def collapse_keys(keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Group keys that differ only in numeric path segments.

    Returns (pattern, members) pairs in natural order of their first member, where pattern shows
    each numeric segment as `{a...b}` (contiguous), `{a,b,d}` (not) or the one value it takes.
    """
    groups: dict[str, list[str]] = {}
    for key in sorted(keys, key=natural_key):
        groups.setdefault(_NUMERIC_SEGMENT.sub("#", key), []).append(key)
    collapsed = []
    for template, members in groups.items():
        columns = list(zip(*(_NUMERIC_SEGMENT.findall(m) for m in members)))
        pattern = template
        for column in columns:
            pattern = pattern.replace("#", _render_indices([int(v) for v in column]), 1)
        collapsed.append((pattern, members))
    return collapsed
