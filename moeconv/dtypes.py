"""safetensors dtype names, their sizes and torch dtypes, and the user-facing dtype spellings.

Plans speak in safetensors names ("BF16") and never import torch: a conversion plans and starts
copying the tensors that need no op while torch is still being imported (see execute)."""

from moeconv.errors import MoeconvError

# safetensors name -> bytes per element. Only byte-sized element types: sub-byte names (F4, F6_*)
# are refused by the reader rather than guessed at. MXFP4 is written as U8 (F4 and F8_E8M0 names exist only in newer safetensors).
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0"}

# safetensors name -> torch attribute (looked up once torch is imported)
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}

# What users may type for --dtype and in recipes -> safetensors name.
USER_DTYPES: dict[str, str] = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
}
SHORT_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}  # how a user dtype is shown back
CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # config.json's "dtype"


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name."""
    return ITEMSIZE[name]


def is_float(name: str) -> bool:
    return name in FLOATS


def to_torch(name: str):
    """torch dtype of a safetensors dtype name (imports torch)."""
    import torch

    dtype = getattr(torch, _TORCH_NAMES[name], None)
    if dtype is None:
        raise MoeconvError(f"dtype {name} needs a newer torch (torch {torch.__version__} has no {_TORCH_NAMES[name]})")
    return dtype


def to_safetensors(dtype) -> str:
    """safetensors dtype name of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for key, torch_name in _TORCH_NAMES.items():
        if torch_name == name:
            return key
    raise MoeconvError(f"dtype {dtype} cannot be written to safetensors")


def parse_user_dtype(text: str) -> str:
    """'bf16' / 'fp16' / 'fp32' (and their long spellings) -> safetensors name, or a clear error."""
    try:
        return USER_DTYPES[text.lower()]
    except KeyError:
        raise MoeconvError(f"unknown dtype '{text}'; use one of bf16, fp16, fp32") from None
