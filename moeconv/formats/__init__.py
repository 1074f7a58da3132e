"""Quantization formats: one module each, which registers its ops (moeconv.ops) and describes the
format here, so the planner can rewrite config.json and the load report can build transformers'
quantized model without naming any format.

Adding a format = a module in this folder (imported at the bottom of this file) + a preset TOML +
tests.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moeconv.errors import FormatError


@dataclass(frozen=True)
class Format:
    """How config.json names a quantization format and which output tensors still carry it."""

    quant_method: str  # config.json quantization_config.quant_method
    keys: re.Pattern  # output keys that hold quantized data (or its scales) in this format
    dtypes: frozenset[str]  # their safetensors dtypes
    # Puts transformers' quantized modules on a model built on the meta device (the load report) and
    # returns the hf_quantizer whose weight conversions transformers' loader adds, or None;
    # None here: the load report does not check checkpoints that stay in this format.
    consumer_layout: Callable[[Any, dict], Any] | None = None
    # The quantization_config a checkpoint quantized into this format gets (when its source had none)
    quantization_config: dict | None = None
    # Raises FormatError naming what this module does not support in a source's quantization_config
    # of this format (a recipe with `format = "<quant_method>"` calls it before its rules run)
    check_config: Callable[[dict], None] | None = None

    def holds(self, key: str, dtype: str) -> bool:
        """Does an output tensor of this key and dtype still carry this format?"""
        return dtype in self.dtypes and self.keys.fullmatch(key) is not None


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.quant_method] = fmt
    return fmt


def check_source(quant_method: str, config: dict) -> None:
    """Raise FormatError unless config.json declares this format in a form its module supports."""
    quantization = config.get("quantization_config")
    declared = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if declared != quant_method:
        has = f"quant_method {declared!r}" if declared else "no quantization_config"
        raise FormatError(f"config.json has {has}, not a {quant_method} checkpoint")
    check = FORMATS[quant_method].check_config
    if check is not None:
        check(quantization)


def output_quantization(config: dict, tensors: list[tuple[str, str]]) -> dict | None:
    """The output's quantization_config: the source's while some (key, dtype) still carries its
    format (or the format is unknown), None once nothing does; for a source without one, that of
    the format the output's tensors were quantized into."""
    quantization = config.get("quantization_config")
    if quantization is None:
        made = [f for f in FORMATS.values() if f.quantization_config and any(f.holds(k, d) for k, d in tensors)]
        return dict(made[0].quantization_config) if made else None
    if not isinstance(quantization, dict):
        return quantization
    fmt = FORMATS.get(quantization.get("quant_method"))
    if fmt is None or any(fmt.holds(key, dtype) for key, dtype in tensors):
        return quantization
    return None


from moeconv.formats import compressed, fp8, mxfp4  # noqa: E402, F401  (each registers its ops and format)
