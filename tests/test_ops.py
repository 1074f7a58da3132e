"""Ops: values on small tensors, op + inverse = identity bit for bit, meta inference = real output,
touches_leading_axis, and the recipe-facing errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeconv.formats  # noqa: F401  (the formats register their ops)
from moeconv import ops
from moeconv.dtypes import to_safetensors
from moeconv.errors import OpError, RecipeError

SETTINGS = settings(max_examples=60, deadline=None)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view, so -0 / NaN payloads compare exactly."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a.contiguous()), bits(b.contiguous()))


# ---- values -------------------------------------------------------------------------------------


def test_concat_split_values():
    gate, up = torch.zeros(2, 3), torch.ones(2, 3)
    (fused,) = ops.apply("concat", [gate, up], {"dim": 0})
    assert fused.tolist() == [[0] * 3, [0] * 3, [1] * 3, [1] * 3]
    a, b = ops.apply("split", [fused], {"dim": 0, "parts": 2})
    assert torch.equal(a, gate) and torch.equal(b, up)
    parts = ops.apply("split", [torch.arange(12).view(2, 6)], {"dim": -1, "parts": 3})
    assert [p.tolist() for p in parts] == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]]]
    assert all(p.is_contiguous() for p in parts)


def test_stack_unstack_values():
    xs = [torch.full((2, 3), float(i)) for i in range(4)]
    (stacked,) = ops.apply("stack", xs, {"dim": 0})
    assert stacked.shape == (4, 2, 3) and stacked[2].eq(2).all()
    (mid,) = ops.apply("stack", xs, {"dim": -1})
    assert mid.shape == (2, 3, 4) and mid[..., 3].eq(3).all()
    back = ops.apply("unstack", [stacked], {})
    assert len(back) == 4 and all(torch.equal(a, b) for a, b in zip(back, xs))


def test_transpose_values_and_contiguous():
    x = torch.arange(24).view(2, 3, 4)
    (y,) = ops.apply("transpose", [x], {"dim0": 1, "dim1": 2})
    assert y.shape == (2, 4, 3) and y.is_contiguous() and torch.equal(y, x.transpose(1, 2))
    (z,) = ops.apply("transpose", [x], {"dim0": -1, "dim1": 0})
    assert torch.equal(z, x.permute(2, 1, 0))


@pytest.mark.parametrize("tile_bytes", [2**10, 3 * 2**9])  # bands of 16 and 24 rows (at least 16): the last one ragged
def test_banded_transpose_equals_the_plain_one(monkeypatch, tile_bytes):
    monkeypatch.setattr(ops, "_TILE_BYTES", tile_bytes)
    x = torch.randn(20, 70, 32).to(torch.bfloat16)  # 88 KiB, above the tile: copied band by band
    for dims in ({"dim0": 1, "dim1": 2}, {"dim0": 2, "dim1": 0}):
        (y,) = ops.apply("transpose", [x], dims)
        assert y.is_contiguous() and same(y, x.transpose(dims["dim0"], dims["dim1"]))


def test_deinterleave_values():
    x = torch.arange(8)  # g0 u0 g1 u1 g2 u2 g3 u3
    assert ops.apply("deinterleave", [x], {"dim": 0})[0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert ops.apply("deinterleave", [x], {"dim": 0, "order": "up-first"})[0].tolist() == [1, 3, 5, 7, 0, 2, 4, 6]
    rows = torch.arange(2 * 6 * 2).view(2, 6, 2)  # [E, 2I, H] with interleaved rows
    (halves,) = ops.apply("deinterleave", [rows], {"dim": 1})
    assert torch.equal(halves[:, :3], rows[:, 0::2]) and torch.equal(halves[:, 3:], rows[:, 1::2])
    (last,) = ops.apply("deinterleave", [rows.transpose(1, 2)], {"dim": -1})  # [E, H, 2I]
    assert torch.equal(last, halves.transpose(1, 2))


def test_interleave_values():
    halves = torch.tensor([10, 11, 12, 20, 21, 22])  # gate.. up..
    assert ops.apply("interleave", [halves], {"dim": 0})[0].tolist() == [10, 20, 11, 21, 12, 22]
    upfirst = torch.tensor([20, 21, 22, 10, 11, 12])  # up.. gate..
    assert ops.apply("interleave", [upfirst], {"dim": 0, "order": "up-first"})[0].tolist() == [10, 20, 11, 21, 12, 22]


def test_cast_values():
    x = torch.tensor([1.5, -0.0, 3.0e38, float("inf"), float("nan")])
    (y,) = ops.apply("cast", [x], {"dtype": "bf16"})
    assert y.dtype == torch.bfloat16 and y[0] == 1.5 and torch.signbit(y[1]) and y[2].isfinite()
    assert y[3].isinf() and y[4].isnan()  # inf/nan stay what they were: not an overflow
    (h,) = ops.apply("cast", [torch.tensor([65504.0, -1e-8])], {"dtype": "float16"})
    assert h.dtype == torch.float16 and h[0] == 65504


def test_cast_overflow_raises():
    with pytest.raises(OpError, match="overflow fp16"):
        ops.apply("cast", [torch.tensor([1.0, 70000.0])], {"dtype": "fp16"})
    with pytest.raises(OpError, match="overflow fp16"):
        ops.apply("cast", [torch.tensor([-1e6], dtype=torch.bfloat16)], {"dtype": "fp16"})
    with pytest.raises(OpError, match="overflow bf16"):  # fp32 max rounds past bf16's max
        ops.apply("cast", [torch.tensor([torch.finfo(torch.float32).max])], {"dtype": "bf16"})


# ---- inverses, bit for bit ----------------------------------------------------------------------


@st.composite
def tensors(draw, min_dims=1, max_dims=4, even_dim=None):
    ndim = draw(st.integers(min_dims, max_dims))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    dim = draw(st.integers(-ndim, ndim - 1))
    if even_dim:
        shape[dim] *= 2
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.uint8]))
    seed = draw(st.integers(0, 2**16))
    raw = torch.randint(
        0,
        256,
        (max(1, torch.Size(shape).numel()) * dtype.itemsize,),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(seed),
    )
    x = raw.view(dtype)[: torch.Size(shape).numel()].view(shape)  # arbitrary bit patterns, NaNs included
    return x, dim


@SETTINGS
@given(tensors(), st.integers(1, 3))
def test_concat_then_split_is_identity(case, parts):
    x, dim = case
    pieces = [x.roll(i) for i in range(parts)]
    (joined,) = ops.apply("concat", pieces, {"dim": dim})
    back = ops.apply("split", [joined], {"dim": dim, "parts": parts})
    assert len(back) == parts and all(same(b, p) for b, p in zip(back, pieces))


@SETTINGS
@given(tensors(), st.integers(1, 3))
def test_split_then_concat_is_identity(case, parts):
    x, dim = case
    x = torch.cat([x] * parts, dim=dim)
    pieces = ops.apply("split", [x], {"dim": dim, "parts": parts})
    assert same(ops.apply("concat", pieces, {"dim": dim})[0], x)


@SETTINGS
@given(tensors(max_dims=3), st.integers(1, 3))
def test_stack_unstack_are_inverse(case, count):
    x, dim = case
    new_dim = dim if dim < 0 else dim + (dim == x.dim() - 1)  # any dim of the (ndim + 1)-d result
    new_dim = max(-(x.dim() + 1), min(new_dim, x.dim()))
    xs = [x.roll(i) for i in range(count)]
    (stacked,) = ops.apply("stack", xs, {"dim": new_dim})
    back = ops.apply("unstack", [stacked], {"dim": new_dim})
    assert len(back) == count and all(same(b, a) for b, a in zip(back, xs))
    assert same(ops.apply("stack", back, {"dim": new_dim})[0], stacked)


@SETTINGS
@given(tensors(), st.data())
def test_transpose_is_its_own_inverse(case, data):
    x, dim0 = case
    dim1 = data.draw(st.integers(-x.dim(), x.dim() - 1))
    (y,) = ops.apply("transpose", [x], {"dim0": dim0, "dim1": dim1})
    assert ops.get_op("transpose").inverse == "transpose"
    assert same(ops.apply("transpose", [y], {"dim0": dim0, "dim1": dim1})[0], x)


@SETTINGS
@given(tensors(even_dim=True), st.sampled_from(["gate-first", "up-first"]))
def test_deinterleave_interleave_are_inverse(case, order):
    x, dim = case
    params = {"dim": dim, "order": order}
    (halves,) = ops.apply("deinterleave", [x], params)
    assert same(ops.apply("interleave", [halves], params)[0], x)
    (rows,) = ops.apply("interleave", [x], params)
    assert same(ops.apply("deinterleave", [rows], params)[0], x)


def test_declared_inverses_are_symmetric():
    for op in ops.OPS.values():
        if op.inverse is not None:
            assert ops.get_op(op.inverse).inverse == op.name
    assert ops.get_op("cast").inverse is None and ops.get_op("dequantize-mxfp4").inverse == "quantize-mxfp4"


# ---- the shape rules equal the real output -------------------------------------------------------

CASES = [
    ("concat", [(torch.bfloat16, (3, 4)), (torch.bfloat16, (5, 4))], {"dim": 0}),
    ("concat", [(torch.float32, (2, 3, 4))] * 3, {"dim": -1}),
    ("split", [(torch.float16, (4, 6))], {"dim": 1, "parts": 3}),
    ("stack", [(torch.bfloat16, (2, 3))] * 4, {"dim": 0}),
    ("stack", [(torch.bfloat16, (2, 3))] * 4, {"dim": -1}),
    ("unstack", [(torch.float32, (3, 2, 5))], {"dim": 1}),
    ("transpose", [(torch.bfloat16, (2, 6, 4))], {"dim0": 1, "dim1": 2}),
    ("deinterleave", [(torch.uint8, (2, 6, 3, 16))], {"dim": 1}),
    ("interleave", [(torch.bfloat16, (2, 4, 6))], {"dim": -1, "order": "up-first"}),
    ("cast", [(torch.float32, (3, 5))], {"dtype": "bf16"}),
    ("cast", [(torch.bfloat16, (3, 5))], {"dtype": "float32"}),
    ("dequantize-mxfp4", [(torch.uint8, (2, 6, 3, 16)), (torch.uint8, (2, 6, 3))], {}),
    ("dequantize-mxfp4", [(torch.uint8, (4, 2, 16)), (torch.uint8, (4, 2))], {"dtype": "fp32"}),
]


def _real(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=dtype, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("name, specs, params", CASES, ids=[c[0] for c in CASES])
def test_infer_matches_real_output(name, specs, params):
    if name == "dequantize-mxfp4":  # realistic scales, so no fp16 overflow
        real = [_real(*specs[0]), torch.randint(110, 135, specs[1][1], dtype=torch.uint8)]
    else:
        real = [_real(dtype, shape, i) for i, (dtype, shape) in enumerate(specs)]
    outputs = ops.apply(name, real, params)
    assert ops.infer(name, names(specs), params) == [(to_safetensors(t.dtype), tuple(t.shape)) for t in outputs]
    assert all(t.is_contiguous() for t in outputs)


def names(specs):
    return [(to_safetensors(dtype), shape) for dtype, shape in specs]


@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_every_shape_rule_equals_its_kernel_on_random_shapes(shape, data):
    """The plan's shapes come from the rules alone (no torch): each must give what its kernel gives."""
    ndim = len(shape)
    x = torch.randn(shape).to(torch.bfloat16)
    dim = data.draw(st.integers(-ndim, ndim - 1))
    even = [*shape]
    even[dim] *= 2
    cases = [
        ("transpose", [x], {"dim0": dim, "dim1": data.draw(st.integers(-ndim, ndim - 1))}),
        ("split", [x.repeat_interleave(3, dim=dim)], {"dim": dim, "parts": 3}),
        ("unstack", [x], {"dim": dim}),
        ("stack", [x, x], {"dim": data.draw(st.integers(-ndim - 1, ndim))}),
        ("concat", [x, x.repeat_interleave(2, dim=dim)], {"dim": dim}),
        ("deinterleave", [torch.randn(even).to(torch.float16)], {"dim": dim}),
        ("interleave", [torch.randn(even)], {"dim": dim, "order": "up-first"}),
        ("cast", [x], {"dtype": "fp32"}),
        (
            "dequantize-mxfp4",
            [torch.randint(0, 256, (*shape, 16), dtype=torch.uint8), torch.full(shape, 127, dtype=torch.uint8)],
            {"dtype": "fp16"},
        ),
    ]
    for name, inputs, params in cases:
        outputs = ops.apply(name, inputs, params)
        specs = [(to_safetensors(t.dtype), tuple(t.shape)) for t in inputs]
        assert ops.infer(name, specs, params) == [(to_safetensors(t.dtype), tuple(t.shape)) for t in outputs], name


@pytest.mark.parametrize(
    "name, specs, params, message",
    [
        (
            "concat",
            [(torch.bfloat16, (4, 8)), (torch.bfloat16, (4, 6))],
            {"dim": 0},
            r"concat: inputs differ in dim 1: \[4, 8\] vs \[4, 6\]",
        ),
        ("concat", [(torch.bfloat16, (4, 8)), (torch.float16, (4, 8))], {"dim": 0}, "concat: inputs differ in dtype"),
        ("concat", [(torch.bfloat16, (4, 8)), (torch.bfloat16, (4, 8, 1))], {"dim": 0}, "concat: inputs differ in rank"),
        (
            "split",
            [(torch.bfloat16, (5, 8))],
            {"dim": 0, "parts": 2},
            "split: dim 0 of \\[5, 8\\] has size 5, not divisible into 2",
        ),
        ("split", [(torch.bfloat16, (4, 8))], {"dim": 2}, "split: dim 2 is out of range for a 2-d tensor"),
        ("stack", [(torch.bfloat16, (2, 3)), (torch.bfloat16, (2, 4))], {}, "stack: inputs differ in dim 1"),
        ("transpose", [(torch.bfloat16, (2, 3))], {"dim0": 0, "dim1": -3}, "transpose: dim1 -3 is out of range"),
        ("deinterleave", [(torch.bfloat16, (2, 5))], {"dim": 1}, "deinterleave: dim 1 of \\[2, 5\\] has odd size 5"),
        ("interleave", [(torch.bfloat16, (3, 4))], {"dim": 0}, "interleave: dim 0 of \\[3, 4\\] has odd size 3"),
        ("dequantize-mxfp4", [(torch.uint8, (2, 3, 16)), (torch.uint8, (2, 4))], {}, "scales \\[2, 4\\] must equal"),
        ("dequantize-mxfp4", [(torch.uint8, (2, 3, 8)), (torch.uint8, (2, 3))], {}, "blocks must be \\[..., G, 16\\]"),
        ("dequantize-mxfp4", [(torch.bfloat16, (2, 3, 16)), (torch.uint8, (2, 3))], {}, "must be U8"),
        ("dequantize-mxfp4", [(torch.uint8, (2, 3, 16))], {}, "takes 2 input tensor"),
    ],
)
def test_infer_shape_errors(name, specs, params, message):
    with pytest.raises(OpError, match=message):
        ops.infer(name, names(specs), params)
    with pytest.raises(OpError, match=message):  # running the op checks its inputs with the same rule
        ops.apply(name, [_real(dtype, shape) for dtype, shape in specs], params)


# ---- row maps: which ops stream row blocks as they are --------------------------------------------


def row_map(name: str, params: dict, ndim: int, n: int = 1, dtype: str = "BF16"):
    """The op's row map for n inputs of rank ndim (a stack's dim counts in its output)."""
    shape = (6, 4, 2, 4)[:ndim]
    if name == "dequantize-mxfp4":
        specs = [("U8", (*shape, 16)[-ndim:]), ("U8", (*shape, 16)[-ndim:-1])]
    else:
        specs = [(dtype, shape)] * n
    return ops.get_op(name).rows(ops.check_params(name, params), specs, 0)


SLICE_CASES = [
    ("concat", 2, {"dim": 1}, 2),
    ("concat", 2, {"dim": -1}, 3),
    ("split", 1, {"dim": 2, "parts": 2}, 3),
    ("stack", 3, {"dim": 1}, 2),
    ("stack", 3, {"dim": -1}, 3),
    ("unstack", 1, {"dim": 1}, 3),
    ("unstack", 1, {"dim": -1}, 2),
    ("transpose", 1, {"dim0": 1, "dim1": 2}, 3),
    ("transpose", 1, {"dim0": -1, "dim1": -2}, 3),
    ("transpose", 1, {"dim0": 0, "dim1": 0}, 3),
    ("deinterleave", 1, {"dim": 1}, 3),
    ("deinterleave", 1, {"dim": -1, "order": "up-first"}, 3),
    ("interleave", 1, {"dim": 2}, 3),
    ("cast", 1, {"dtype": "fp16"}, 2),
    ("cast", 1, {"dtype": "fp32"}, 1),
]


@pytest.mark.parametrize("name, n, params, ndim", SLICE_CASES, ids=[f"{c[0]}-{c[2]}" for c in SLICE_CASES])
def test_ops_that_leave_axis_0_commute_with_slicing(name, n, params, ndim):
    assert isinstance(row_map(name, params, ndim, n), ops.SameRows)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(*(6, 4, 2, 4)[:ndim], generator=g).to(torch.bfloat16) for _ in range(n)]
    whole = ops.apply(name, xs, params)
    for a, b in [(0, 6), (1, 4), (5, 6), (2, 2)]:
        parts = ops.apply(name, [x[a:b] for x in xs], params)
        assert len(parts) == len(whole)
        assert all(same(p, w[a:b]) for p, w in zip(parts, whole))


def test_dequantize_commutes_with_slicing_expert_axis():
    assert isinstance(row_map("dequantize-mxfp4", {}, 4), ops.SameRows)
    assert isinstance(row_map("dequantize-mxfp4", {}, 3), ops.SameRows)
    assert row_map("dequantize-mxfp4", {}, 2) is None  # [G, 16]: axis 0 is the group axis: computed whole
    blocks = torch.randint(0, 256, (5, 4, 3, 16), dtype=torch.uint8)
    scales = torch.randint(100, 140, (5, 4, 3), dtype=torch.uint8)
    (whole,) = ops.apply("dequantize-mxfp4", [blocks, scales], {})
    (part,) = ops.apply("dequantize-mxfp4", [blocks[1:3], scales[1:3]], {})
    assert same(part, whole[1:3])


@pytest.mark.parametrize(
    "name, params, ndim",
    [
        ("concat", {"dim": 0}, 2),
        ("concat", {"dim": -2}, 2),
        ("split", {"dim": 0, "parts": 2}, 3),
        ("split", {}, 3),  # default dim 0
        ("stack", {"dim": 0}, 2),
        ("stack", {"dim": -3}, 2),  # -3 of the 3-d output is 0
        ("unstack", {}, 3),
        ("transpose", {"dim0": 0, "dim1": 1}, 3),
        ("transpose", {"dim0": 2, "dim1": -3}, 3),
        ("deinterleave", {"dim": 0}, 2),
        ("interleave", {"dim": -2}, 2),
    ],
)
def test_ops_along_axis_0_say_so(name, params, ndim):
    found = row_map(name, params, ndim, n=2 if name in ("concat", "stack") else 1)
    moves = name in ("concat", "split", "stack", "unstack")  # whole rows, as they are
    assert isinstance(found, ops.MovesRows) if moves else found is None


def test_along_axis_0_slicing_really_differs():
    x = torch.arange(8).view(4, 2)
    (whole,) = ops.apply("deinterleave", [x], {"dim": 0})
    (part,) = ops.apply("deinterleave", [x[0:2]], {"dim": 0})
    assert not torch.equal(part, whole[0:2])


# ---- schema errors ------------------------------------------------------------------------------


def test_unknown_op_lists_known_ops():
    with pytest.raises(RecipeError) as info:
        ops.get_op("transpos")
    message = str(info.value)
    assert "unknown op 'transpos'" in message and "did you mean 'transpose'" in message
    for name in ops.OPS:
        assert name in message


def test_check_params_fills_defaults():
    assert ops.check_params("split", {}) == {"dim": 0, "parts": 2, "sizes": []}
    assert ops.check_params("deinterleave", {"dim": 1}) == {"dim": 1, "order": "gate-first"}
    assert ops.check_params("dequantize-mxfp4", {}) == {"dtype": "BF16"}  # one spelling inside
    assert ops.check_params("transpose", {"dim0": 1, "dim1": 2}) == {"dim0": 1, "dim1": 2}


@pytest.mark.parametrize(
    "name, params, needles",
    [
        ("transpose", {"dim0": 1, "dim1": 2, "dim2": 3}, ["unknown parameter 'dim2'", "dim0 (an int, required)"]),
        ("split", {"dims": 1}, ["unknown parameter 'dims'", "did you mean 'dim'", "parts (an int, default 2)"]),
        ("transpose", {"dim0": 1}, ["missing required parameter 'dim1'", "int"]),
        ("cast", {}, ["missing required parameter 'dtype'", "one of bf16"]),
        ("transpose", {"dim0": "1", "dim1": 2}, ["parameter 'dim0' must be an int", "'1'"]),
        ("split", {"parts": 2.0}, ["parameter 'parts' must be an int"]),
        ("split", {"dim": True}, ["parameter 'dim' must be an int", "True"]),
        (
            "deinterleave",
            {"dim": 1, "order": "gate_first"},
            ["parameter 'order' must be one of gate-first, up-first", "'gate_first'"],
        ),
        ("cast", {"dtype": "int8"}, ["parameter 'dtype' must be one of", "bf16", "fp16", "fp32", "'int8'"]),
        ("dequantize-mxfp4", {"dtype": ["bf16"]}, ["parameter 'dtype' must be one of"]),
    ],
)
def test_check_params_errors_name_the_parameter(name, params, needles):
    with pytest.raises(RecipeError) as info:
        ops.check_params(name, params)
    message = str(info.value)
    assert message.startswith(name + ":")
    for needle in needles:
        assert needle in message


def test_every_op_has_a_one_line_doc():
    for op in ops.OPS.values():
        assert op.doc and "\n" not in op.doc


def test_apply_checks_input_count():
    with pytest.raises(OpError, match="transpose: takes 1 input"):
        ops.apply("transpose", [torch.zeros(2, 2), torch.zeros(2, 2)], {"dim0": 0, "dim1": 1})
    with pytest.raises(OpError, match="concat: needs at least one input"):
        ops.apply("concat", [], {})
