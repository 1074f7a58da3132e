"""The load report: what transformers will find MISSING, UNEXPECTED or MISMATCHED in a planned output.

Decided before any data moves. The consumer is transformers itself, not a copy of its rules:

1. The model class is built on the meta device the way `from_pretrained` builds it
   (`cls.get_init_context(...)`, so no weights and no memory, even for a 120b config).
2. The planned output (key -> dtype, shape) becomes a state dict of meta tensors and goes through
   transformers' own loader, `core_model_loading.convert_and_load_state_dict_in_model`, with the
   model's own conversion mapping (`conversion_mapping.get_model_conversion_mapping`). Renamings,
   `base_model_prefix` adding/stripping and the WeightConverter merges (per-expert Mixtral `w1/w3/w2`,
   Qwen `gate_proj/up_proj/down_proj` -> fused `gate_up_proj` / `down_proj`) run for real, on meta
   tensors, so a fused shape that comes out wrong is a MISMATCHED key with the shapes transformers
   would compare.
3. Then the same post-processing as `_finalize_model_loading`: `tie_weights(missing_keys=...)` (a tied
   `lm_head` is not missing when `embed_tokens` is there, or the other way round) and
   `_adjust_missing_and_unexpected_keys` (`_keys_to_ignore_on_load_missing/unexpected`, stale
   `rotary_emb.inv_freq` / `position_ids`). Non-persistent buffers are not in `state_dict()`, so they
   are never expected.

Dtypes: transformers casts every floating tensor to the parameter's dtype at load time, so a float vs
float difference (BF16 output, F32 model) is NOT a mismatch. An integer/bool tensor where the model
holds a float (or the reverse) is, and so is a 1-byte float (FP8) against a wider one: that is a
quantized tensor under a dequantized name or vice versa.
(transformers would cast those silently too and load garbage: this rule is stricter than its loader.)

Quantization: a config that keeps `quantization_config` is judged by the key names that quantization
serializes, whatever this machine could run. transformers only builds its quantized modules with GPU
kernels, so each format module puts transformers' own quantized modules on the meta model itself
(`Format.consumer_layout`, e.g. moeconv/formats/mxfp4.py, fp8.py), and hands back the quantizer whose
weight conversions the loader adds (FP8: scales fused with their experts). A quant_method with none
is not checked.
(`Mxfp4GptOssExperts` declares its biases F32, so `expected_tensors` says F32 there; any float loads.)

Not checked (`checked=False` with the reason) rather than guessed: no transformers, no or unknown
model_type, unknown quant_method, a config transformers refuses to build. A converter that raises on
the planned shapes (e.g. one expert short for the merge) is reported as transformers reports it: the
fused key stays MISSING and the converter's message is in `conversion_errors`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from moeconv import dtypes
from moeconv.errors import MoeconvError
from moeconv.formats import FORMATS
from moeconv.keys import collapse_keys, natural_key

if TYPE_CHECKING:
    import torch
    from rich.console import Console

# The install command works however moeconv was installed (the range is pyproject.toml's "transformers" extra).
TRANSFORMERS_MISSING = "transformers is not installed: pip install 'transformers>=5.0,<6'"

Planned = dict[str, tuple[str, tuple[int, ...]]]


class ConsumerUnavailable(MoeconvError):
    """The consumer model cannot be built here (no transformers, unknown model_type, ...)."""


@dataclass
class Mismatch:
    key: str
    expected: dict  # {"shape": [...], "dtype": "BF16"}
    actual: dict


@dataclass
class LoadReport:
    checked: bool  # False when transformers is missing or the model_type unknown
    reason: str | None  # why not checked
    consumer: str | None  # e.g. "transformers 5.24.0 GptOssForCausalLM"
    missing: list[str] = field(default_factory=list)  # model has it, output lacks it
    unexpected: list[str] = field(default_factory=list)  # output has it, model has no place for it
    mismatched: list[Mismatch] = field(default_factory=list)  # shape (or int/float kind) differs
    # transformers' own `conversion_errors`: a converter (e.g. the expert merge) raised on these keys
    conversion_errors: dict[str, str] = field(default_factory=dict)
    # keys that load but mean something else than transformers expects (rows reordered, transposed):
    # key -> how (from the plan, see plan._Planner._layout); never clean
    layouts: dict[str, str] = field(default_factory=dict)

    def ok(self) -> bool:
        """Checked, and nothing missing, unexpected, mismatched or failing to convert."""
        return self.checked and not (self.missing or self.unexpected or self.mismatched or self.conversion_errors or self.layouts)

    def to_json(self) -> dict:
        return {
            "checked": self.checked,
            "ok": self.ok(),
            "reason": self.reason,
            "consumer": self.consumer,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": [asdict(m) for m in self.mismatched],
            "conversion_errors": dict(self.conversion_errors),
            "layouts": dict(self.layouts),
        }


# ---------------------------------------------------------------------------------------------
# Building the consumer on the meta device


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ConsumerUnavailable(TRANSFORMERS_MISSING) from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns (and draws a progress bar) on a meta dry run: keep the user's terminal clean."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _config_object(transformers, config: dict):
    model_type = config.get("model_type")
    if not model_type:
        raise ConsumerUnavailable("config.json has no model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ConsumerUnavailable(f"model_type '{model_type}' is unknown to transformers {transformers.__version__}")
    values = {k: v for k, v in config.items() if k != "quantization_config"}
    return CONFIG_MAPPING[model_type].from_dict(values)


def _model_class(transformers, config_obj, architectures: list[str] | None):
    """The class from_pretrained would build: config.architectures[0] if transformers has it, else the
    causal-LM auto class for the config (base model if there is no LM head class)."""
    from transformers import PreTrainedModel

    for name in architectures or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    for mapping in (transformers.MODEL_FOR_CAUSAL_LM_MAPPING, transformers.MODEL_MAPPING):
        if type(config_obj) in mapping:
            return mapping[type(config_obj)]
    raise ConsumerUnavailable(
        f"transformers {transformers.__version__} has no model class for model_type '{config_obj.model_type}'"
    )


MAX_LAYERS = 1000  # the largest models have ~100; building a claimed 200,000 on meta takes hours
MAX_EXPERTS = 4096


def _check_size(config: dict) -> None:
    """Refuse (as not checked) a config that claims more layers or experts than any model has."""
    for scope in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for name, most in (("num_hidden_layers", MAX_LAYERS), ("num_local_experts", MAX_EXPERTS), ("num_experts", MAX_EXPERTS)):
            value = scope.get(name)
            if isinstance(value, int) and value > most:
                raise ConsumerUnavailable(f"config.json {name} = {value}: more than the {most} the load report builds")


def _build_meta_model(config: dict):
    """(model on meta, consumer description, the hf_quantizer whose weight conversions the loader
    applies or None). Raises ConsumerUnavailable with the reason."""
    import torch

    transformers = _import_transformers()
    quantization = config.get("quantization_config")
    quant_method = (quantization or {}).get("quant_method")
    layouts = {name: fmt.consumer_layout for name, fmt in FORMATS.items() if fmt.consumer_layout is not None}
    if quantization is not None and quant_method not in layouts:
        raise ConsumerUnavailable(
            f"quant_method '{quant_method}' is not known to moeconv's load report (known: {', '.join(sorted(layouts))})"
        )
    _check_size(config)
    with _quiet_transformers():
        config_obj = _config_object(transformers, config)
        cls = _model_class(transformers, config_obj, config.get("architectures"))
        # from_pretrained's default dtype="auto": the config's dtype
        dtype = config_obj.dtype if isinstance(getattr(config_obj, "dtype", None), torch.dtype) else torch.float32
        try:
            contexts = cls.get_init_context(dtype, False, False, None)
        except TypeError:  # another transformers 5.x signature: meta + dtype is what matters
            contexts = [torch.device("meta")]
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            model = cls(config_obj)
        quantizer = layouts[quant_method](model, quantization) if quantization is not None else None
    consumer = f"transformers {transformers.__version__} {cls.__name__}"
    if quantization is not None:
        consumer += f" ({quant_method})"
    return model, consumer, quantizer


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return dtypes.to_safetensors(dtype)
    except MoeconvError:
        return str(dtype).removeprefix("torch.")


def expected_tensors(config: dict) -> tuple[dict[str, tuple[str, tuple[int, ...]]], str]:
    """(key -> (safetensors dtype, shape), consumer description) of what transformers expects to load
    for this config.json dict: the state dict of the model built on meta (quantized names if the
    config keeps a known quantization_config). Keys the loader forgives (tied targets, ignore lists)
    are still listed: `check_load` applies those rules. Raises ConsumerUnavailable with the reason."""
    model, consumer, _ = _build_meta_model(config)
    return {k: (_dtype_name(t.dtype), tuple(t.shape)) for k, t in model.state_dict().items()}, consumer


# ---------------------------------------------------------------------------------------------
# The check


def _kind(dtype: torch.dtype) -> str:
    """What a loader's silent cast cannot bridge: integers, bools, floats, and 1-byte floats (FP8
    data means nothing without its scales, so bf16 under an FP8 name, or FP8 under a bf16 one, is a
    mismatch)."""
    import torch

    if dtype.is_floating_point:
        return "float8" if dtype.itemsize == 1 else "float"
    return "bool" if dtype == torch.bool else "int"


def _one_line(error: str) -> str:
    """transformers stores traceback + message + "Error: <Op> on tensors destined for <key>...":
    keep "<Op> on tensors destined for <key>...: <message>"."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if len(lines) >= 2 and lines[-1].startswith("Error: "):
        return f"{lines[-1].removeprefix('Error: ')}: {lines[-2]}"
    return lines[-1] if lines else error


def check_load(planned: Planned, config: dict | None) -> LoadReport:
    """Compare the planned output (key -> (safetensors dtype, shape)) against what transformers
    expects for `config`, by running transformers' loader on meta tensors (see the module doc)."""
    if config is None:
        return LoadReport(False, "no config.json to build the consumer model from", None)
    config = copy.deepcopy(config)  # transformers edits nested dicts (rope_scaling gains rope_theta): not the plan's
    try:
        model, consumer, quantizer = _build_meta_model(config)
    except ConsumerUnavailable as error:
        return LoadReport(False, str(error), None)
    except Exception as error:  # a config transformers refuses: say so instead of crashing the plan
        return LoadReport(False, f"transformers could not build the model: {type(error).__name__}: {error}", None)
    try:
        return _simulate_load(model, consumer, planned, quantizer)
    except Exception as error:  # transformers' loader raised outside its own per-key error capture
        reason = f"transformers' loader failed on the planned keys: {type(error).__name__}: {error}"
        return LoadReport(False, reason, consumer)


class ReportProcess:
    """`check_load` in a child process, started now and asked later (`result`), while the caller
    converts. In a thread, importing transformers and building the model (seconds of pure Python,
    and cold file reads) held the GIL the conversion's threads need: 1.29x the wall time of an
    8-layer gpt-oss conversion from cold caches; and transformers sets torch's process-wide default
    dtype while it builds. The child is forked where the platform can (it starts with what this
    process imported already) and spawned elsewhere; a daemon, it ends with the conversion."""

    def __init__(self, planned: Planned, config: dict | None):
        import multiprocessing

        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        self._answers, child_end = context.Pipe(duplex=False)
        self._process = context.Process(target=_answer, args=(child_end, planned, config), name="moeconv-report", daemon=True)
        self._process.start()
        child_end.close()
        self._result: LoadReport | None = None

    def result(self) -> LoadReport:
        """The load report (waits for it); a failure in the child is raised here."""
        if self._result is None:
            try:
                status, value = self._answers.recv()
            except EOFError:
                self._process.join()
                raise MoeconvError(
                    f"the load report's process ended without an answer (exit code {self._process.exitcode})"
                ) from None
            self._process.join()
            self._answers.close()
            if status == "error":
                raise value
            self._result = value
        return self._result


def _answer(answers, planned: Planned, config: dict | None) -> None:
    """The child's side of ReportProcess. A forked child inherits the CLI's signal handlers: it
    takes the default ones, so the parent ending it (terminate: SIGTERM) or a Ctrl-C sent to the
    whole process group ends it quietly instead of raising in the middle of its work."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the child
    try:
        answers.send(("ok", check_load(planned, config)))
    except BaseException as error:  # the parent raises it where the report is read
        answers.send(("error", error))


def _simulate_load(model, consumer: str, planned: Planned, quantizer=None) -> LoadReport:
    """from_pretrained's loading steps, on meta tensors shaped like the plan (with the quantizer's
    own weight conversions, e.g. FP8 scales fused with their experts)."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        convert_and_load_state_dict_in_model,
        rename_source_key,
    )
    from transformers.modeling_utils import LoadStateDictConfig

    expected = {k: (t.dtype, tuple(t.shape)) for k, t in model.state_dict().items()}
    planned_dtypes = {k: dtypes.to_torch(dtype) if dtype in dtypes.ITEMSIZE else torch.uint8 for k, (dtype, _) in planned.items()}
    state_dict = {key: torch.empty(shape, dtype=planned_dtypes[key], device="meta") for key, (_, shape) in planned.items()}

    with _quiet_transformers():
        mapping = get_model_conversion_mapping(model, hf_quantizer=quantizer)
        # Our own pass over the same renaming (fresh copies: transforms keep state) for the dtype check.
        renamings = [copy.deepcopy(t) for t in mapping if not isinstance(t, WeightConverter)]
        converters = [copy.deepcopy(t) for t in mapping if isinstance(t, WeightConverter)]
        # device "meta": every tensor stays metadata; dtype None: each param keeps its own (floats are cast anyway)
        load_config = LoadStateDictConfig(device_map={"": "meta"}, dtype=None, weight_mapping=mapping)
        info, _ = convert_and_load_state_dict_in_model(model, state_dict, load_config)
        model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
        model._adjust_missing_and_unexpected_keys(info)

    mismatched = {
        key: Mismatch(
            key,
            {"shape": list(model_shape), "dtype": _dtype_name(expected[key][0])},
            {"shape": list(ckpt_shape), "dtype": None},
        )
        for key, ckpt_shape, model_shape in info.mismatched_keys
    }
    # Integer-vs-float kind, and the planned dtype for every mismatch, from transformers' renaming.
    for key in sorted(planned, key=natural_key):
        target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if target not in expected and key in expected:  # transformers' own second try, unrenamed
            target, _ = rename_source_key(key, [], [], model.base_model_prefix, expected)
        if target not in expected:
            continue
        actual_dtype = _dtype_name(planned_dtypes[key])
        if target in mismatched and mismatched[target].actual["dtype"] is None:
            mismatched[target].actual["dtype"] = actual_dtype
        if _kind(planned_dtypes[key]) != _kind(expected[target][0]) and target not in mismatched:
            actual = {"shape": list(planned[key][1]), "dtype": actual_dtype}
            if target != key:  # renamed / merged by transformers: say which planned key it was
                actual["source"] = key
            expected_entry = {"shape": list(expected[target][1]), "dtype": _dtype_name(expected[target][0])}
            mismatched[target] = Mismatch(target, expected_entry, actual)

    return LoadReport(
        checked=True,
        reason=None,
        consumer=consumer,
        missing=sorted(info.missing_keys - set(mismatched), key=natural_key),
        unexpected=sorted(info.unexpected_keys, key=natural_key),
        mismatched=[mismatched[k] for k in sorted(mismatched, key=natural_key)],
        conversion_errors={k: _one_line(v) for k, v in sorted(info.conversion_errors.items())},
    )


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape(entry: dict) -> str:
    text = "[" + ", ".join(map(str, entry.get("shape") or [])) + "]"
    return f"{entry['dtype']} {text}" if entry.get("dtype") else text


def render_report(report: LoadReport, console: Console, *, wide: bool = False) -> None:
    """A table like transformers' LOAD REPORT, numeric segments collapsed
    (`model.layers.{0...23}.mlp.experts.gate_up_proj_scales | UNEXPECTED`); or one line saying the
    load could not be checked and why; or one line saying it is clean."""
    from moeconv.display import Column, KeyRow, key_table, print_all, safe

    if not report.checked:
        console.print(f"[yellow]load report: not checked[/yellow] - {safe(report.reason)}", highlight=False)
        _render_layouts(report, console)
        return
    if report.ok():
        console.print(f"[green]load report: clean[/green] - {safe(report.consumer)} loads every key, nothing left over")
        return
    if not (report.missing or report.unexpected or report.mismatched or report.conversion_errors):
        _render_layouts(report, console)
        return

    def row(pattern: str, status: str, style: str, planned: str = "", expected: str = "", note: str = "") -> KeyRow:
        return KeyRow(pattern, (status, planned, expected), note, (style, "", ""))

    rows = [row(p, "UNEXPECTED", "dark_orange") for p, _ in collapse_keys(report.unexpected)]
    rows += [row(p, "MISSING", "red") for p, _ in collapse_keys(report.missing)]
    by_shapes: dict[tuple[str, str], list[str]] = {}
    for m in report.mismatched:
        by_shapes.setdefault((_shape(m.actual), _shape(m.expected)), []).append(m.key)
    for (actual, expected), keys in by_shapes.items():
        rows += [row(p, "MISMATCHED", "purple", actual, expected) for p, _ in collapse_keys(keys)]
    for pattern, members in collapse_keys(report.conversion_errors):
        rows.append(row(pattern, "CONVERSION ERROR", "red", note=report.conversion_errors[members[0]]))
    columns = [Column("status"), Column("planned"), Column("expected")]
    title = f"LOAD REPORT vs {report.consumer}"
    print_all(console, *key_table(console, title, columns, rows, note_header="error", wide=wide), wide=wide)
    counts = f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, {len(report.mismatched)} mismatched"
    if report.conversion_errors:
        counts += f", {len(report.conversion_errors)} conversion errors"
    console.print(counts)
    _render_layouts(report, console)


def layout_lines(report: LoadReport) -> list[str]:
    """One line per family of keys whose meaning is not transformers' layout, and how."""
    by_how: dict[str, list[str]] = {}
    for key, how in report.layouts.items():
        by_how.setdefault(how, []).append(key)
    return [f"{pattern}: {how}" for how, keys in by_how.items() for pattern, _ in collapse_keys(keys)]


def _render_layouts(report: LoadReport, console: Console) -> None:
    from moeconv.display import safe

    if not report.layouts:
        return
    consumer = safe(report.consumer or "transformers")
    console.print(
        f"[red]load report: not clean[/red] - {consumer} would load these keys and compute a different function "
        "(their rows or columns mean something else than its layout):",
        highlight=False,
    )
    from moeconv.display import printable

    for line in layout_lines(report):
        console.print(f"  {printable(line)}", markup=False, highlight=False)
