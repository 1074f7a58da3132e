"""Ops: small pure tensor functions registered by name. Their keyword-only parameters ARE the schema
recipes are checked against (`check_params`). Each op also has a shape rule: output dtypes and
shapes from input ones, in pure Python, so the plan learns them without data and without torch
(`infer`; a conversion plans and starts copying while torch is still being imported). The rule
also checks the inputs, for planning and running alike; tests hold every rule to the kernel's real
output.

An op receives whole tensors or row blocks of their leading axis (the executor streams expert by
expert): `Op.touches_leading_axis(params, ndim)` says whether op(x[a:b]) can differ from op(x)[a:b],
in which case the executor must route rows itself or materialize the tensor.

Every output is contiguous: its bytes are written as they are.
"""

from __future__ import annotations  # kernels annotate with torch types; torch is imported when one runs

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from moeconv import dtypes
from moeconv.dtypes import USER_DTYPES
from moeconv.errors import OpError, RecipeError

if TYPE_CHECKING:
    import torch

DtypeName = Literal[tuple(USER_DTYPES)]  # "bf16", "bfloat16", "fp16", ... (one list, in dtypes.py)
Order = Literal["gate-first", "up-first"]
Spec = tuple[str, tuple[int, ...]]  # (safetensors dtype name, shape) of a tensor, without its data


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable  # fn(*tensors, **params) -> Tensor | tuple[Tensor, ...]
    shape: Callable  # shape(specs, **params) -> [Spec, ...]: fn's outputs; raises OpError on bad inputs
    n_inputs: int | None  # exact number of input tensors; None = one or more
    inverse: str | None  # name of the inverse op, None when there is none (lossy)
    doc: str  # one line, shown by `moeconv ops` and in recipe errors
    leading: Callable[[dict, int], bool]  # (params with defaults, input ndim) -> touches axis 0

    def params(self) -> dict[str, inspect.Parameter]:
        """The keyword-only parameters of fn: the op's recipe schema."""
        return {
            name: p for name, p in inspect.signature(self.fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def defaults(self) -> dict:
        return {name: p.default for name, p in self.params().items() if p.default is not inspect.Parameter.empty}

    def touches_leading_axis(self, params: dict, ndim: int) -> bool:
        """True if op(x[a:b]) != op(x)[a:b] in general (slicing every input's axis 0 alike)."""
        if ndim == 0:
            return True
        return self.leading({**self.defaults(), **params}, ndim)

    def signature(self) -> str:
        """'transpose(x, *, dim0: int, dim1: int)' for listings and error messages."""
        return f"{self.name}{inspect.signature(self.fn)}".replace("'", "")


OPS: dict[str, Op] = {}


def register(name: str, *, shape: Callable, inverse: str | None = None, n_inputs: int | None = 1, leading: Callable[[dict, int], bool]):
    """Decorator: register fn as op `name`, `shape` its shape rule. `leading(params, ndim)` answers
    touches_leading_axis."""

    def decorate(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        OPS[name] = Op(name, fn, shape, n_inputs, inverse, doc, leading)
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
    return {name: eval(p.annotation, op.fn.__globals__) for name, p in op.params().items()}  # noqa: S307 (our own source)


def _describe(annotation) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) is list:
        return f"a list of {typing.get_args(annotation)[0].__name__}"
    return f"an {annotation.__name__}" if annotation.__name__[0] in "aeiou" else f"a {annotation.__name__}"


def _fits(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation) and isinstance(value, str | int)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_params(op_name: str, params: dict) -> dict:
    """Validate names and types against the op's keyword-only signature; returns params with defaults."""
    op = get_op(op_name)
    schema = op.params()
    hints = _param_hints(op)
    allowed = ", ".join(
        f"{n} ({_describe(hints[n])}{', required' if p.default is inspect.Parameter.empty else f', default {p.default!r}'})"
        for n, p in schema.items()
    ) or "none"
    for name in params:
        if name not in schema:
            close = difflib.get_close_matches(str(name), schema, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"{op_name}: unknown parameter '{name}'{hint}; parameters: {allowed}")
    checked = {}
    for name, p in schema.items():
        if name not in params:
            if p.default is inspect.Parameter.empty:
                raise RecipeError(f"{op_name}: missing required parameter '{name}' ({_describe(hints[name])})")
            checked[name] = p.default
            continue
        value = params[name]
        if not _fits(value, hints[name]):
            raise RecipeError(f"{op_name}: parameter '{name}' must be {_describe(hints[name])}, got {value!r}")
        checked[name] = value
    return checked


# ---- running ------------------------------------------------------------------------------------


def _checked(op_name: str, specs: list[Spec], params: dict) -> tuple[Op, dict, list[Spec]]:
    """The op, its parameters with defaults, and its output specs; OpError/RecipeError on bad input."""
    op = get_op(op_name)
    checked = check_params(op_name, params)
    if op.n_inputs is None and not specs:
        raise OpError(f"{op_name}: needs at least one input tensor")
    if op.n_inputs is not None and len(specs) != op.n_inputs:
        raise OpError(f"{op_name}: takes {op.n_inputs} input tensor(s), got {len(specs)}")
    return op, checked, op.shape(specs, **checked)


def infer(op_name: str, specs: list[Spec], params: dict) -> list[Spec]:
    """Output (safetensors dtype, shape)s of an op from its inputs' alone (pure Python, no torch)."""
    return _checked(op_name, [(dtype, tuple(shape)) for dtype, shape in specs], params)[2]


def apply(op_name: str, tensors: list[torch.Tensor], params: dict) -> list[torch.Tensor]:
    """Run op on tensors; always returns a list (split/unstack return several)."""
    op, checked, _ = _checked(op_name, [(dtypes.to_safetensors(t.dtype), tuple(t.shape)) for t in tensors], params)
    result = op.fn(*tensors, **checked)
    return list(result) if isinstance(result, tuple | list) else [result]


# ---- helpers ------------------------------------------------------------------------------------


def _dim(op: str, dim: int, ndim: int, what: str = "dim") -> int:
    """Normalize a possibly negative dim against ndim, or a clear OpError."""
    if not -ndim <= dim < ndim:
        raise OpError(f"{op}: {what} {dim} is out of range for a {ndim}-d tensor (use {-ndim}..{ndim - 1})")
    return dim % ndim


def _is_0(dim: int, ndim: int) -> bool:
    """dim normalizes to 0 (an out-of-range dim counts as touching: the op will refuse it anyway)."""
    return not -ndim <= dim < ndim or dim % ndim == 0


def _along_dim_0(params: dict, ndim: int) -> bool:
    return _is_0(params["dim"], ndim)


def _along_new_dim_0(params: dict, ndim: int) -> bool:  # stack: dim counts in the output, ndim + 1
    return _along_dim_0(params, ndim + 1)


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


def _output(shape: list[int], like: torch.Tensor) -> torch.Tensor:
    """Where an op writes its result (`like`'s dtype): recycled memory (buffers.py)."""
    from moeconv import buffers

    return buffers.empty(shape, like.dtype)


# ---- the ops: shape rule, then kernel (the rule has checked the inputs before a kernel runs) -----


def _concat_shape(specs: list[Spec], *, dim: int) -> list[Spec]:
    (dtype, shape), d = specs[0], _dim("concat", dim, len(specs[0][1]))
    _same("concat", specs, skip=d)
    out = list(shape)
    out[d] = sum(s[d] for _, s in specs)
    return [(dtype, tuple(out))]


@register("concat", shape=_concat_shape, inverse="split", n_inputs=None, leading=_along_dim_0)
def concat(*xs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Join tensors along an existing dim (e.g. gate [I, H] + up [I, H] -> [2I, H])."""
    import torch

    shape = list(xs[0].shape)
    shape[dim % xs[0].dim()] = sum(x.shape[dim % x.dim()] for x in xs)
    return torch.cat(xs, dim=dim, out=_output(shape, xs[0]))  # contiguous


def _split_shape(specs: list[Spec], *, dim: int, parts: int) -> list[Spec]:
    (dtype, shape), = specs
    d = _dim("split", dim, len(shape))
    if parts < 1 or shape[d] % parts:
        raise OpError(f"split: dim {dim} of {list(shape)} has size {shape[d]}, not divisible into {parts} equal parts")
    piece = shape[:d] + (shape[d] // parts,) + shape[d + 1 :]
    return [(dtype, piece)] * parts


@register("split", shape=_split_shape, inverse="concat", leading=_along_dim_0)
def split(x: torch.Tensor, *, dim: int = 0, parts: int = 2) -> tuple[torch.Tensor, ...]:
    """Cut a tensor into `parts` equal pieces along dim (e.g. [2I, H] -> gate [I, H], up [I, H])."""
    return tuple(piece.contiguous() for piece in x.split(x.shape[dim] // parts, dim=dim))


def _stack_shape(specs: list[Spec], *, dim: int) -> list[Spec]:
    (dtype, shape), d = specs[0], _dim("stack", dim, len(specs[0][1]) + 1)
    _same("stack", specs, skip=None)
    return [(dtype, shape[:d] + (len(specs),) + shape[d:])]


@register("stack", shape=_stack_shape, inverse="unstack", n_inputs=None, leading=_along_new_dim_0)
def stack(*xs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Stack equal-shaped tensors along a new dim (E experts [2I, H] -> [E, 2I, H])."""
    import torch

    shape = list(xs[0].shape)
    shape.insert(dim % (xs[0].dim() + 1), len(xs))
    return torch.stack(xs, dim=dim, out=_output(shape, xs[0]))


def _unstack_shape(specs: list[Spec], *, dim: int) -> list[Spec]:
    (dtype, shape), = specs
    d = _dim("unstack", dim, len(shape))
    return [(dtype, shape[:d] + shape[d + 1 :])] * shape[d]


@register("unstack", shape=_unstack_shape, inverse="stack", leading=_along_dim_0)
def unstack(x: torch.Tensor, *, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Split a tensor into its slices along dim, removing it ([E, 2I, H] -> E x [2I, H])."""
    return tuple(piece.contiguous() for piece in x.unbind(dim))


_TILE_BYTES = 3 * 2**19  # 1.5 MiB: a band of the source that stays in this machine's 2 MiB L2


def _transpose_leading(params: dict, ndim: int) -> bool:
    d0, d1 = params["dim0"], params["dim1"]
    return (_is_0(d0, ndim) or _is_0(d1, ndim)) and d0 % ndim != d1 % ndim


def _transpose_shape(specs: list[Spec], *, dim0: int, dim1: int) -> list[Spec]:
    (dtype, shape), = specs
    d0, d1 = _dim("transpose", dim0, len(shape), "dim0"), _dim("transpose", dim1, len(shape), "dim1")
    out = list(shape)
    out[d0], out[d1] = shape[d1], shape[d0]
    return [(dtype, tuple(out))]


@register("transpose", shape=_transpose_shape, inverse="transpose", leading=_transpose_leading)
def transpose(x: torch.Tensor, *, dim0: int, dim1: int) -> torch.Tensor:
    """Swap two dims, contiguous result ([E, 2I, H] -> [E, H, 2I] with dim0 = 1, dim1 = 2)."""
    d0, d1 = dim0 % x.dim(), dim1 % x.dim()
    a, b = min(d0, d1), max(d0, d1)
    if a == b or x.numel() * x.element_size() < _TILE_BYTES or x.shape[a] <= 16:
        return x.transpose(d0, d1).contiguous()
    # One strided copy of a [5760, 2880] bf16 matrix runs at ~1.2e8 elem/s here (every read misses
    # cache); copying bands of rows of x's dim a that fit in L2 runs at ~9e8 (tiles measured 16..1920).
    out = _output(list(x.transpose(a, b).shape), x)  # x's shape with dims a and b swapped
    band_bytes = x.element_size() * x[(0,) * a].numel() // x.shape[a]  # bytes of one index along dim a
    band = max(16, _TILE_BYTES // max(band_bytes, 1))
    for start in range(0, x.shape[a], band):
        size = min(band, x.shape[a] - start)
        out.narrow(b, start, size).copy_(x.narrow(a, start, size).transpose(a, b))
    return out


def _pairs_shape(op: str):
    """The shape rule of (de)interleave: the same shape, with an even size along dim."""

    def rule(specs: list[Spec], *, dim: int, order: str) -> list[Spec]:
        (dtype, shape), = specs
        d = _dim(op, dim, len(shape))
        if shape[d] % 2:
            raise OpError(f"{op}: dim {dim} of {list(shape)} has odd size {shape[d]}; gate/up rows come in pairs")
        return [(dtype, shape)]

    return rule


@register("deinterleave", shape=_pairs_shape("deinterleave"), inverse="interleave", leading=_along_dim_0)
def deinterleave(x: torch.Tensor, *, dim: int, order: Order = "gate-first") -> torch.Tensor:
    """Rows g0 u0 g1 u1 .. along dim (gpt-oss: even = gate, odd = up) -> halves g.. u.. (or u.. g..)."""
    d = dim % x.dim()
    halves = x.unflatten(d, (x.shape[d] // 2, 2)).transpose(d, d + 1)  # [.., 2, n, ..]: 0 = gate, 1 = up
    if order == "up-first":
        halves = halves.flip(d)
    return halves.reshape(x.shape).contiguous()


@register("interleave", shape=_pairs_shape("interleave"), inverse="deinterleave", leading=_along_dim_0)
def interleave(x: torch.Tensor, *, dim: int, order: Order = "gate-first") -> torch.Tensor:
    """Halves g.. u.. (or u.. g.. with up-first) along dim -> rows g0 u0 g1 u1 .. (gpt-oss order)."""
    d = dim % x.dim()
    halves = x.unflatten(d, (2, x.shape[d] // 2))  # [.., 2, n, ..]
    if order == "up-first":
        halves = halves.flip(d)  # now 0 = gate, 1 = up
    return halves.transpose(d, d + 1).reshape(x.shape).contiguous()  # [.., n, 2, ..] -> g0 u0 g1 u1 ..


def _never(params: dict, ndim: int) -> bool:
    return False


def _cast_shape(specs: list[Spec], *, dtype: str) -> list[Spec]:
    (_, shape), = specs
    return [(USER_DTYPES[dtype], shape)]


@register("cast", shape=_cast_shape, leading=_never)
def cast(x: torch.Tensor, *, dtype: DtypeName) -> torch.Tensor:
    """Convert to bf16 / fp16 / fp32; a finite value that would become inf is an error, never silent."""
    import torch

    target = dtypes.to_torch(USER_DTYPES[dtype])
    y = x.to(target).contiguous()
    if y.is_floating_point() and torch.isinf(y).any():
        overflow = torch.isinf(y) & ~torch.isinf(x.to(torch.float64) if not x.is_floating_point() else x)
        count = int(overflow.sum())
        if count:
            largest = float(x[overflow].abs().max())
            raise OpError(
                f"cast: {count} value(s) overflow {dtype} (largest magnitude {largest:.6g}, "
                f"{dtype} max {torch.finfo(target).max:.6g}); keep a wider dtype"
            )
    return y


def _mxfp4_leading(params: dict, ndim: int) -> bool:
    return ndim <= 2  # blocks [G, 16]: axis 0 is the group axis and the output's axis 0 is 32x longer


def _dequantize_mxfp4_shape(specs: list[Spec], *, dtype: str) -> list[Spec]:
    (blocks_dtype, blocks), (scales_dtype, scales) = specs
    if blocks_dtype != "U8" or scales_dtype != "U8":
        raise OpError(f"dequantize-mxfp4: blocks and scales must be U8, got {blocks_dtype} and {scales_dtype}")
    if len(blocks) < 2 or blocks[-1] != 16:
        raise OpError(f"dequantize-mxfp4: blocks must be [..., G, 16], got {list(blocks)}")
    if blocks[:-1] != scales:
        raise OpError(f"dequantize-mxfp4: scales {list(scales)} must equal blocks' shape without the last dim {list(blocks[:-1])}")
    return [(USER_DTYPES[dtype], blocks[:-2] + (blocks[-2] * 32,))]


@register("dequantize-mxfp4", shape=_dequantize_mxfp4_shape, n_inputs=2, leading=_mxfp4_leading)
def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, dtype: DtypeName = "bf16") -> torch.Tensor:
    """MXFP4 U8 blocks [.., G, 16] + U8 scales [.., G] -> [.., G*32] (source row orientation), bit-exact."""
    from moeconv import mxfp4

    return mxfp4.dequantize(blocks, scales, dtype=dtypes.to_torch(USER_DTYPES[dtype]))
