"""A toy quantization format, added the way a real one is: this module and a recipe, nothing else.

int8 weights with one float32 scale per row: value = weight * scale[row]. Importing this module
registers its op and describes the format (see tests/test_format_extension.py).
"""

import re

import torch

from moeconv import dtypes, ops
from moeconv.errors import OpError
from moeconv.formats import Format, register_format


def _shape(specs: list[ops.Spec], *, dtype: str) -> list[ops.Spec]:
    (weight_dtype, weight), (scale_dtype, scale) = specs
    if weight_dtype != "I8" or scale_dtype != "F32" or len(weight) != 2 or scale != weight[:1]:
        raise OpError(
            f"dequantize-int8-rows: needs I8 [R, C] and F32 [R], got {weight_dtype} {list(weight)}, {scale_dtype} {list(scale)}"
        )
    return [(dtype, weight)]


@ops.register("dequantize-int8-rows", shape=_shape, rows=ops.same_rows, n_inputs=2)
def dequantize_int8_rows(weight: torch.Tensor, scale: torch.Tensor, *, dtype: ops.Dtype = "bf16") -> torch.Tensor:
    """int8 [R, C] * float32 scale [R] -> [R, C] in dtype."""
    return (weight.to(torch.float32) * scale[:, None]).to(dtypes.to_torch(dtype))  # [R, C]


FORMAT = register_format(
    Format(quant_method="toy-int8", keys=re.compile(r".+\.weight(_scale)?"), dtypes=frozenset({"I8", "F32"}))
)
