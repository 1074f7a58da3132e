"""safetensors dtype names, their torch dtypes and sizes, and the user-facing dtype spellings."""

import torch

from moeconv.errors import MoeconvError

# safetensors name -> torch dtype. Only byte-sized element types: sub-byte names (F4, F6_*) are
# refused by the reader rather than guessed at. MXFP4 is written as U8 (see DESIGN.md).
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    SAFETENSORS_TO_TORCH["F8_E8M0"] = torch.float8_e8m0fnu

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# What users may type for --dtype and in recipes.
USER_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return SAFETENSORS_TO_TORCH[name].itemsize


def to_torch(name: str) -> torch.dtype:
    """torch dtype of a safetensors dtype name."""
    return SAFETENSORS_TO_TORCH[name]


def to_safetensors(dtype: torch.dtype) -> str:
    """safetensors dtype name of a torch dtype."""
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise MoeconvError(f"dtype {dtype} cannot be written to safetensors") from None


def parse_user_dtype(text: str) -> torch.dtype:
    """'bf16' / 'fp16' / 'fp32' (and their long spellings) -> torch dtype, or a clear error."""
    try:
        return USER_DTYPES[text.lower()]
    except KeyError:
        raise MoeconvError(f"unknown dtype '{text}'; use one of bf16, fp16, fp32") from None
