"""Ops: small pure tensor functions registered by name: the one extension point of moeconv.

An op declares, at registration:
- its kernel `fn(*tensors, **params)`, whose keyword-only parameters ARE the schema recipes are
  checked against (`check_params`, once, at plan time);
- its shape rule: output (dtype, shape)s from the inputs' alone, in pure Python, so the plan knows
  every output without data (tests hold every rule to the kernel's real output);
- how its output rows map to its inputs' rows (`rows`), so that it streams: `SameRows` (op of a row
  block = that row block of the op: transposes of inner axes, casts, dequantization), `MovesRows`
  (output rows are input rows as they are: stack, concat, split, unstack along axis 0; copied as
  bytes when the inputs are source bytes) or None (computed whole, then sliced);
- its inverse, where one exists.

A quantization format registers its ops here from its own module (moeconv/formats/). Every dtype is
a safetensors name ("BF16"); a `Dtype` parameter takes the user's spelling ("bf16") and is stored as
that name. Every kernel output is contiguous: its bytes are written as they are.
"""

from __future__ import annotations  # kernels annotate with torch types

import difflib
import functools
import inspect
import itertools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from moeconv import arena, dtypes
from moeconv.errors import OpError, RecipeError

if TYPE_CHECKING:
    import torch

Order = Literal["gate-first", "up-first"]
Spec = tuple[str, tuple[int, ...]]  # (safetensors dtype name, shape) of a tensor, without its data
Piece = tuple[int, int, int, int | None]  # (input index, start, stop, within): see MovesRows
MAX_PIECES = 4096  # split/unstack make at most this many tensors (a file may claim any dim; models have <= 512 experts)


class Dtype(str):
    """Annotation of an op parameter naming an output dtype: bf16, fp16 or fp32 in recipes
    (their long spellings too), a safetensors name ("BF16") once checked."""


@dataclass(frozen=True)
class SameRows:
    """Output rows start:stop are the op applied to rows start:stop of every input, or to the rows
    `inputs(start, stop)` gives per input (a scale with one row per block of rows). A block starts
    at a multiple of `multiple` (other starts are computed from the block around them)."""

    multiple: int = 1
    inputs: Callable[[int, int], list[tuple[int, int]]] | None = None


@dataclass(frozen=True)
class MovesRows:
    """Output rows are input rows as they are, in byte order: `pieces(start, stop, within)` lists
    them as (input index, start, stop, within) ranges; `within` = k means rows of the first axis
    of row k (one expert of a stacked tensor). `within_ok`: pieces also answers for rows within one
    output row (a row too big for one chunk); `passes_within`: it does so by asking its inputs for
    rows within a row; `asks_within`: even its plain rows are rows within its inputs' rows."""

    pieces: Callable[[int, int, int | None], list[Piece]]
    within_ok: bool = False
    passes_within: bool = False
    asks_within: bool = False


RowMap = SameRows | MovesRows | None
SAME_ROWS = SameRows()


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable  # fn(*tensors, **params) -> Tensor | tuple[Tensor, ...]
    shape: Callable  # shape(specs, **params) -> [Spec, ...]: fn's outputs; raises OpError on bad inputs
    rows: Callable[[dict, list[Spec], int], RowMap]  # (params, input specs, output index) -> row map
    n_inputs: int | None  # exact number of input tensors; None = one or more
    inverse: str | None  # name of the inverse op, None when there is none (lossy)
    doc: str  # one line, shown by `moeconv ops` and in recipe errors
    reorders: bool = False  # changes what rows or columns mean with names and sizes kept (see plan._layout)
    fanout: str | None = None  # several outputs: the template variable naming each (recipes may rename it with `as`)

    def params(self) -> dict[str, inspect.Parameter]:
        """The keyword-only parameters of fn: the op's recipe schema."""
        return {name: p for name, p in inspect.signature(self.fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def signature(self) -> str:
        """'transpose(x, *, dim0: int, dim1: int)' for listings and error messages."""
        return f"{self.name}{inspect.signature(self.fn)}".replace("'", "")


OPS: dict[str, Op] = {}


def register(
    name: str,
    *,
    shape: Callable,
    rows: Callable[[dict, list[Spec], int], RowMap],
    inverse: str | None = None,
    n_inputs: int | None = 1,
    reorders: bool = False,
    fanout: str | None = None,
):
    """Decorator: register fn as op `name` with its shape rule and row map (see the module doc);
    `reorders`: the op changes what rows or columns mean (a transpose, a gate/up reordering)."""

    def decorate(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        OPS[name] = Op(name, fn, shape, rows, n_inputs, inverse, doc, reorders, fanout)
        return fn

    return decorate


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except (KeyError, TypeError):
        pass
    close = difflib.get_close_matches(str(name), OPS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise RecipeError(f"unknown op '{name}'{hint}; known ops: {', '.join(sorted(OPS))}")


# ---- parameter schema ---------------------------------------------------------------------------


def _param_hints(op: Op) -> dict:
    """The keyword-only parameters' annotations, evaluated (the tensor ones would need torch)."""
    return {
        name: eval(p.annotation, op.fn.__globals__) if isinstance(p.annotation, str) else p.annotation  # noqa: S307 (our own source)
        for name, p in op.params().items()
    }


def _describe(annotation) -> str:
    if annotation is Dtype:
        return "one of " + ", ".join(dtypes.USER_DTYPES)
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) is list:
        return f"a list of {typing.get_args(annotation)[0].__name__}"
    return f"an {annotation.__name__}" if annotation.__name__[0] in "aeiou" else f"a {annotation.__name__}"


def _fits(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Dtype:
        return isinstance(value, str) and (value.lower() in dtypes.USER_DTYPES or value in dtypes.SHORT_NAMES)
    if origin is Literal:
        return value in typing.get_args(annotation) and isinstance(value, str | int)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_params(op_name: str, params: dict, deferred: frozenset[str] = frozenset()) -> dict:
    """Validate names and types against the op's keyword-only signature; returns params with
    defaults, dtypes as safetensors names. RecipeError names the parameter and what it takes.
    `deferred`: parameters whose value is only known later (from config.json): name checked only."""
    op = get_op(op_name)
    schema = op.params()
    hints = _param_hints(op)
    allowed = (
        ", ".join(
            f"{n} ({_describe(hints[n])}{', required' if p.default is inspect.Parameter.empty else f', default {p.default!r}'})"
            for n, p in schema.items()
        )
        or "none"
    )
    for name in params:
        if name not in schema:
            close = difflib.get_close_matches(str(name), schema, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{op_name}: unknown parameter '{name}'{hint}; parameters: {allowed}")
    checked = {}
    for name, p in schema.items():
        if name in deferred:
            checked[name] = params[name]
            continue
        value = params.get(name, p.default)
        if value is inspect.Parameter.empty:
            raise RecipeError(f"{op_name}: missing required parameter '{name}' ({_describe(hints[name])})")
        if name in params and not _fits(value, hints[name]):
            raise RecipeError(f"{op_name}: parameter '{name}' must be {_describe(hints[name])}, got {value!r}")
        if hints[name] is Dtype and value not in dtypes.SHORT_NAMES:
            value = dtypes.USER_DTYPES[value.lower()]
        checked[name] = value
    return checked


# ---- planning and running -----------------------------------------------------------------------


def infer(op_name: str, specs: list[Spec], params: dict) -> list[Spec]:
    """Output (safetensors dtype, shape)s of an op on inputs of these specs (pure Python, no torch).
    OpError when the inputs do not fit the op, RecipeError when the parameters do not."""
    op = get_op(op_name)
    params = check_params(op_name, params)
    if op.n_inputs is None and not specs:
        raise OpError(f"{op_name}: needs at least one input tensor")
    if op.n_inputs is not None and len(specs) != op.n_inputs:
        raise OpError(f"{op_name}: takes {op.n_inputs} input tensor(s), got {len(specs)}")
    return op.shape([(dtype, tuple(shape)) for dtype, shape in specs], **params)


def run(op_name: str, tensors: list[torch.Tensor], params: dict) -> list[torch.Tensor]:
    """Run an op on tensors with CHECKED params (the plan checked them once); always a list."""
    result = get_op(op_name).fn(*tensors, **params)
    return list(result) if isinstance(result, tuple | list) else [result]


def apply(op_name: str, tensors: list[torch.Tensor], params: dict | None = None) -> list[torch.Tensor]:
    """Check params and inputs as a plan would, then run: for use from Python and tests."""
    checked = check_params(op_name, params or {})
    infer(op_name, [(dtypes.to_safetensors(t.dtype), tuple(t.shape)) for t in tensors], checked)
    return run(op_name, tensors, checked)


# ---- helpers for shape rules and row maps --------------------------------------------------------


def _dim(op: str, dim: int, ndim: int, what: str = "dim") -> int:
    """Normalize a possibly negative dim against ndim, or a clear OpError."""
    if not -ndim <= dim < ndim:
        raise OpError(f"{op}: {what} {dim} is out of range for a {ndim}-d tensor (use {-ndim}..{ndim - 1})")
    return dim % ndim


def _same(op: str, specs: list[Spec], skip: int | None) -> None:
    """All inputs agree in dtype, ndim and every dim but `skip`."""
    dtype, shape = specs[0]
    for other_dtype, other in specs[1:]:
        if other_dtype != dtype:
            raise OpError(f"{op}: inputs differ in dtype: {dtype} vs {other_dtype}")
        if len(other) != len(shape):
            raise OpError(f"{op}: inputs differ in rank: {list(shape)} vs {list(other)}")
        for d in range(len(shape)):
            if d != skip and other[d] != shape[d]:
                raise OpError(f"{op}: inputs differ in dim {d}: {list(shape)} vs {list(other)}")


def same_rows_unless_dim_0(dim_param: str = "dim"):
    """Row map of an op acting along one dim: rows stream unless that dim is axis 0 (then whole)."""

    def rows(params: dict, specs: list[Spec], index: int) -> RowMap:
        ndim = len(specs[0][1])
        return SAME_ROWS if ndim and params[dim_param] % ndim != 0 else None

    return rows


def same_rows(params: dict, specs: list[Spec], index: int) -> RowMap:
    """Row map of an elementwise op: rows stream (0-d tensors are computed whole)."""
    return SAME_ROWS if specs[0][1] else None


def _row_ranges(sizes: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Rows start:stop of inputs laid end to end along axis 0: (input, start, stop) in each."""
    found, offset = [], 0
    for i, size in enumerate(sizes):
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            found.append((i, lo - offset, hi - offset))
        offset += size
    return found


# ---- the ops: shape rule, row map, kernel (the shape rule checked the inputs before a kernel runs) ---


def _concat_shape(specs: list[Spec], *, dim: int) -> list[Spec]:
    (dtype, shape), d = specs[0], _dim("concat", dim, len(specs[0][1]))
    _same("concat", specs, skip=d)
    out = list(shape)
    out[d] = sum(s[d] for _, s in specs)
    return [(dtype, tuple(out))]


def _concat_rows(params: dict, specs: list[Spec], index: int) -> RowMap:
    if params["dim"] % len(specs[0][1]) != 0:
        return SAME_ROWS  # the shape rule checked that the inputs' axis 0 agree
    sizes = [shape[0] for _, shape in specs]

    def pieces(start: int, stop: int, within: int | None) -> list[Piece]:
        if within is not None:
            ((i, row, _),) = _row_ranges(sizes, within, within + 1)
            return [(i, start, stop, row)]
        return [(i, a, b, None) for i, a, b in _row_ranges(sizes, start, stop)]

    return MovesRows(pieces, within_ok=True, passes_within=True)


@register("concat", shape=_concat_shape, rows=_concat_rows, inverse="split", n_inputs=None, reorders=True)
def concat(*xs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Join tensors along an existing dim (e.g. gate [I, H] + up [I, H] -> [2I, H])."""
    import torch

    shape = list(xs[0].shape)
    shape[dim % xs[0].dim()] = sum(x.shape[dim % x.dim()] for x in xs)
    return torch.cat(xs, dim=dim, out=arena.empty(shape, xs[0].dtype))  # contiguous


def _split_sizes(shape: tuple[int, ...], d: int, parts: int, sizes: list[int]) -> list[int]:
    """The pieces' sizes along dim d: `sizes` as given, or `parts` equal ones; OpError if they do not fit."""
    if sizes:
        if len(sizes) > MAX_PIECES:
            raise OpError(f"split: {len(sizes)} sizes, more than the {MAX_PIECES} tensors a split may make")
        if any(size < 0 for size in sizes) or sum(sizes) != shape[d] or (parts not in (2, len(sizes))):
            shown = sizes if len(sizes) <= 16 else [*sizes[:16], "..."]
            raise OpError(
                f"split: sizes {shown} must be {len(sizes)} non-negative sizes summing to dim {d} of {list(shape)} ({shape[d]})"
            )
        return list(sizes)
    if parts < 1 or parts > MAX_PIECES or shape[d] % parts:
        raise OpError(f"split: dim {d} of {list(shape)} has size {shape[d]}, not divisible into {parts} equal parts")
    return [shape[d] // parts] * parts


def _split_shape(specs: list[Spec], *, dim: int, parts: int, sizes: list[int]) -> list[Spec]:
    ((dtype, shape),) = specs
    d = _dim("split", dim, len(shape))
    return [(dtype, shape[:d] + (size,) + shape[d + 1 :]) for size in _split_sizes(shape, d, parts, sizes)]


@functools.lru_cache(maxsize=64)
def _split_starts(shape: tuple[int, ...], parts: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Where each piece of a dim-0 split starts: computed once per split, not once per piece
    (thousands of pieces made planning quadratic)."""
    return (0, *itertools.accumulate(_split_sizes(shape, 0, parts, list(sizes))))


def _split_rows(params: dict, specs: list[Spec], index: int) -> RowMap:
    ((_, shape),) = specs
    if params["dim"] % len(shape) != 0:
        return SAME_ROWS
    first = _split_starts(tuple(shape), params["parts"], tuple(params["sizes"]))[index]

    def pieces(start: int, stop: int, within: int | None) -> list[Piece]:
        if within is not None:
            return [(0, start, stop, first + within)]
        return [(0, first + start, first + stop, None)]

    return MovesRows(pieces, within_ok=True, passes_within=True)


@register("split", shape=_split_shape, rows=_split_rows, inverse="concat", reorders=True, fanout="part")
def split(x: torch.Tensor, *, dim: int = 0, parts: int = 2, sizes: list[int] = []) -> tuple[torch.Tensor, ...]:
    """Cut a tensor along dim into `parts` equal pieces ([2I, H] -> gate [I, H], up [I, H]) or pieces of `sizes` (q/k/v)."""
    lengths = _split_sizes(tuple(x.shape), dim % x.dim(), parts, sizes)
    return tuple(piece.contiguous() for piece in x.split(lengths, dim=dim))


def _stack_shape(specs: list[Spec], *, dim: int) -> list[Spec]:
    (dtype, shape), d = specs[0], _dim("stack", dim, len(specs[0][1]) + 1)
    _same("stack", specs, skip=None)
    return [(dtype, shape[:d] + (len(specs),) + shape[d:])]


def _stack_rows(params: dict, specs: list[Spec], index: int) -> RowMap:
    member = specs[0][1]
    if params["dim"] % (len(member) + 1) != 0:
        return SAME_ROWS if member else None
    if not member:
        return None  # a stack of scalars: one small tensor, computed whole

    def pieces(start: int, stop: int, within: int | None) -> list[Piece]:
        if within is not None:
            return [(within, start, stop, None)]  # rows of one member
        return [(i, 0, member[0], None) for i in range(start, stop)]

    return MovesRows(pieces, within_ok=True)


@register("stack", shape=_stack_shape, rows=_stack_rows, inverse="unstack", n_inputs=None)
def stack(*xs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Stack equal-shaped tensors along a new dim (E experts [2I, H] -> [E, 2I, H])."""
    import torch

    shape = list(xs[0].shape)
    shape.insert(dim % (xs[0].dim() + 1), len(xs))
    return torch.stack(xs, dim=dim, out=arena.empty(shape, xs[0].dtype))


def _unstack_shape(specs: list[Spec], *, dim: int) -> list[Spec]:
    ((dtype, shape),) = specs
    d = _dim("unstack", dim, len(shape))
    if shape[d] > MAX_PIECES:
        raise OpError(f"unstack: dim {dim} of {list(shape)} would make {shape[d]} tensors, more than {MAX_PIECES}")
    return [(dtype, shape[:d] + shape[d + 1 :])] * shape[d]


def _unstack_rows(params: dict, specs: list[Spec], index: int) -> RowMap:
    ((_, shape),) = specs
    if params["dim"] % len(shape) != 0:
        return SAME_ROWS if len(shape) > 1 else None
    if len(shape) < 2:
        return None

    def pieces(start: int, stop: int, within: int | None) -> list[Piece]:
        return [(0, start, stop, index)]  # rows of row `index` of the input

    return MovesRows(pieces, asks_within=True)


@register("unstack", shape=_unstack_shape, rows=_unstack_rows, inverse="stack", fanout="index")
def unstack(x: torch.Tensor, *, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Split a tensor into its slices along dim, removing it ([E, 2I, H] -> E x [2I, H])."""
    return tuple(piece.contiguous() for piece in x.unbind(dim))


_TILE_BYTES = 3 * 2**19  # 1.5 MiB: a band of the source that stays in this machine's 2 MiB L2


def _transpose_rows(params: dict, specs: list[Spec], index: int) -> RowMap:
    ndim = len(specs[0][1])
    d0, d1 = params["dim0"] % max(ndim, 1), params["dim1"] % max(ndim, 1)
    return SAME_ROWS if ndim and (d0 == d1 or 0 not in (d0, d1)) else None


def _transpose_shape(specs: list[Spec], *, dim0: int, dim1: int) -> list[Spec]:
    ((dtype, shape),) = specs
    d0, d1 = _dim("transpose", dim0, len(shape), "dim0"), _dim("transpose", dim1, len(shape), "dim1")
    out = list(shape)
    out[d0], out[d1] = shape[d1], shape[d0]
    return [(dtype, tuple(out))]


@register("transpose", shape=_transpose_shape, rows=_transpose_rows, inverse="transpose", reorders=True)
def transpose(x: torch.Tensor, *, dim0: int, dim1: int) -> torch.Tensor:
    """Swap two dims, contiguous result ([E, 2I, H] -> [E, H, 2I] with dim0 = 1, dim1 = 2)."""
    d0, d1 = dim0 % x.dim(), dim1 % x.dim()
    a, b = min(d0, d1), max(d0, d1)
    if a == b or x.numel() * x.element_size() < _TILE_BYTES or x.shape[a] <= 16:
        return x.transpose(d0, d1).contiguous()
    # One strided copy of a [5760, 2880] bf16 matrix runs at ~1.2e8 elem/s here (every read misses
    # cache); copying bands of rows of x's dim a that fit in L2 runs at ~9e8 (tiles measured 16..1920).
    out = arena.empty(list(x.transpose(a, b).shape), x.dtype)  # x's shape with dims a and b swapped
    band_bytes = x.element_size() * x[(0,) * a].numel() // x.shape[a]  # bytes of one index along dim a
    band = max(16, _TILE_BYTES // max(band_bytes, 1))
    for start in range(0, x.shape[a], band):
        size = min(band, x.shape[a] - start)
        out.narrow(b, start, size).copy_(x.narrow(a, start, size).transpose(a, b))
    return out


def _pairs_shape(op: str):
    """The shape rule of (de)interleave: the same shape, with an even size along dim."""

    def rule(specs: list[Spec], *, dim: int, order: str) -> list[Spec]:
        ((dtype, shape),) = specs
        d = _dim(op, dim, len(shape))
        if shape[d] % 2:
            raise OpError(f"{op}: dim {dim} of {list(shape)} has odd size {shape[d]}; gate/up rows come in pairs")
        return [(dtype, shape)]

    return rule


@register("deinterleave", shape=_pairs_shape("deinterleave"), rows=same_rows_unless_dim_0(), inverse="interleave", reorders=True)
def deinterleave(x: torch.Tensor, *, dim: int, order: Order = "gate-first") -> torch.Tensor:
    """Rows g0 u0 g1 u1 .. along dim (gpt-oss: even = gate, odd = up) -> halves g.. u.. (or u.. g..)."""
    d = dim % x.dim()
    halves = x.unflatten(d, (x.shape[d] // 2, 2)).transpose(d, d + 1)  # [.., 2, n, ..]: 0 = gate, 1 = up
    if order == "up-first":
        halves = halves.flip(d)
    return halves.reshape(x.shape).contiguous()


@register("interleave", shape=_pairs_shape("interleave"), rows=same_rows_unless_dim_0(), inverse="deinterleave", reorders=True)
def interleave(x: torch.Tensor, *, dim: int, order: Order = "gate-first") -> torch.Tensor:
    """Halves g.. u.. (or u.. g.. with up-first) along dim -> rows g0 u0 g1 u1 .. (gpt-oss order)."""
    d = dim % x.dim()
    halves = x.unflatten(d, (2, x.shape[d] // 2))  # [.., 2, n, ..]
    if order == "up-first":
        halves = halves.flip(d)  # now 0 = gate, 1 = up
    return halves.transpose(d, d + 1).reshape(x.shape).contiguous()  # [.., n, 2, ..] -> g0 u0 g1 u1 ..


def _cast_shape(specs: list[Spec], *, dtype: str, lossy: bool = False) -> list[Spec]:
    ((_, shape),) = specs
    return [(dtype, shape)]


@register("cast", shape=_cast_shape, rows=same_rows)
def cast(x: torch.Tensor, *, dtype: Dtype, lossy: bool = False) -> torch.Tensor:
    """Convert to bf16 / fp16 / fp32; a finite value that would become inf is an error, never silent; so is an integer the dtype cannot hold exactly, unless lossy = true."""
    import torch

    target = dtypes.to_torch(dtype)
    y = x.to(target).contiguous()
    if not x.is_floating_point() and not lossy:  # bf16 holds integers exactly up to 256, fp16 2048, fp32 2**24
        changed = y.to(x.dtype) != x
        if changed.any():
            before, after = x[changed][0].item(), y[changed][0].item()
            raise OpError(
                f"cast: {int(changed.sum())} integer value(s) change in {dtypes.SHORT_NAMES[dtype]} (e.g. {before} "
                f"becomes {after:.10g}); add lossy = true to the cast to accept the rounding"
            )
    if y.is_floating_point() and torch.isinf(y).any():
        overflow = torch.isinf(y) & ~torch.isinf(x.to(torch.float64) if not x.is_floating_point() else x)
        count = int(overflow.sum())
        if count:
            largest = float(x[overflow].abs().max())
            raise OpError(
                f"cast: {count} value(s) overflow {dtypes.SHORT_NAMES[dtype]} (largest magnitude {largest:.6g}, "
                f"{dtypes.SHORT_NAMES[dtype]} max {torch.finfo(target).max:.6g}); keep a wider dtype"
            )
    return y
