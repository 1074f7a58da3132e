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
    """True for a plain ASCII decimal number such as `7` or `12` (at most MAX_INDEX_DIGITS digits)."""
    return bool(text) and len(text) <= MAX_INDEX_DIGITS and text.isascii() and text.isdigit()


def natural_key(key: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`."""
    # re.split with one capture group alternates text, digits, text, ...: odd positions are numbers,
    # ordered by length then digits (no int(): a key may carry a number of thousands of digits).
    return tuple(
        (len(part.lstrip("0")), part.lstrip("0"), part) if i % 2 else part for i, part in enumerate(_DIGIT_RUN.split(key))
    )


MAX_INDEX_DIGITS = 18  # a numeric segment longer than this is text, not an index (int() of it is unbounded work)


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
        if any(len(v) > MAX_INDEX_DIGITS for column in columns for v in column):
            collapsed += [(m, [m]) for m in members]
            continue
        pattern = template
        for column in columns:
            pattern = pattern.replace("#", _render_indices([int(v) for v in column]), 1)
        collapsed.append((pattern, members))
    return collapsed
