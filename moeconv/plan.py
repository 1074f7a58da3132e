"""The plan: every output tensor, shard and problem, decided from headers alone.

Rules are applied in order; each sees the keys the earlier ones produced (cascade), so a user
recipe can transpose what a preset fused. Nothing here reads tensor data: ops' shape rules give
every output's dtype and shape, and the format module lays out every shard, so a dry run is exact
and errors surface before any I/O. The load report (moeconv.report) is computed on demand
(`Plan.report`), or started on a thread while the data moves (`Plan.start_report`).
"""

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from moeconv import __version__, companions, dtypes, formats, ops
from moeconv.errors import MoeconvError, PlanError
from moeconv.format import ShardLayout, TensorSpec, plan_shards
from moeconv.graph import Node, OpNode, SourceNode, infer_outputs
from moeconv.keys import collapse_keys, is_number, natural_key
from moeconv.recipe import CONFIG_PREFIX, OpStep, Recipe, Rule, render_template
from moeconv.report import LoadReport, ReportProcess, check_load
from moeconv.source import Checkpoint

DEFAULT_DTYPE = "BF16"  # what "$dtype" means when --dtype is not given


@dataclass
class Entry:
    """A key of the namespace while rules run: its lazy tensor and where it came from."""

    node: Node
    sources: tuple[str, ...]
    rules: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    layout: tuple[str, ...] = ()  # how its meaning left transformers' layout (see _Planner._layout)


@dataclass
class Value:
    """One tensor flowing through a rule's op chain, with the template variables it carries."""

    node: Node
    variables: dict[str, str]
    sources: tuple[str, ...]
    ops: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()  # earlier rules that produced the inputs (cascade)
    layout: tuple[str, ...] = ()


@dataclass
class PlannedTensor:
    """One output tensor: what it is, where it comes from, where it goes."""

    key: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    rules: tuple[str, ...]
    ops: tuple[str, ...]
    node: Node = field(repr=False)
    shard: str = ""
    offset: int = 0
    layout: tuple[str, ...] = ()  # why its meaning is not transformers' layout (empty: it is)

    @property
    def nbytes(self) -> int:
        return self.node.nbytes

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "nbytes": self.nbytes,
            "shard": self.shard,
            "offset": self.offset,
            "sources": list(self.sources),
            "rules": list(self.rules),
            "ops": list(self.ops),
            "layout": list(self.layout),
        }


@dataclass
class Plan:
    """Everything a conversion will do, decided before any tensor data is read."""

    source: Checkpoint
    recipes: list[Recipe]
    tensors: dict[str, PlannedTensor]
    shards: list[ShardLayout]
    config: dict | None  # the output config.json
    companion_files: list[str]  # small files copied next to the shards (names relative to the source root)
    warnings: list[str]
    align: int
    max_shard_size: int = 5 * 10**9
    dtype: str | None = None  # --dtype as a safetensors name ("BF16"), None when not given
    _report: "LoadReport | ReportProcess | None" = field(default=None, repr=False)
    _report_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rebuild(self) -> dict:
        """What re-planning needs besides the source: recipe origins and TOML texts, options."""
        return {
            "recipes": [{"origin": r.origin, "text": r.text} for r in self.recipes],
            "dtype": dtypes.SHORT_NAMES[self.dtype] if self.dtype else None,
            "align": self.align,
            "max_shard_size": self.max_shard_size,
        }

    def planned(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """key -> (safetensors dtype, shape) of every output tensor."""
        return {t.key: (t.dtype, t.shape) for t in self.tensors.values()}

    def start_report(self) -> None:
        """Start computing the load report in a child process while the caller goes on (importing
        transformers takes seconds); `report` then waits for it."""
        with self._report_lock:
            if self._report is None:
                self._report = ReportProcess(self.planned(), self.config)

    @property
    def report(self) -> LoadReport:
        """What transformers would find missing, unexpected or mismatched (computed once)."""
        with self._report_lock:
            if self._report is None:
                self._report = check_load(self.planned(), self.config)
            report = self._report
        if not isinstance(report, LoadReport):  # a ReportProcess or another future-like answer
            report = report.result()
            self._report = report
        report.layouts = {t.key: "; ".join(t.layout) for t in self.tensors.values() if t.layout}
        return report

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def to_json(self) -> dict:
        return {
            "source": self.source.origin,
            "recipes": [r.origin for r in self.recipes],
            "align": self.align,
            **self.report.to_json(),
            "warnings": self.warnings,
            "total_bytes": self.total_bytes,
            "shards": self.shards_json(),
            "files": self.companion_files,
            "tensors": self.tensors_json(),
        }

    def shards_json(self) -> list[dict]:
        return [{"name": s.name, "size": s.size, "tensors": len(s.order), "misaligned": s.misaligned} for s in self.shards]

    def tensors_json(self) -> list[dict]:
        return [t.to_json() for t in self.tensors.values()]


class _Planner:
    def __init__(self, source: Checkpoint, dtype: str | None):
        self.source = source
        self.config = source.config or {}
        self.dtype = dtype
        self.namespace: dict[str, Entry] = {
            key: Entry(SourceNode(source, key, info.dtype, info.shape), (key,)) for key, info in source.tensors.items()
        }
        self.warnings: list[str] = []

    # ---- one rule ---------------------------------------------------------------------------------

    def apply_recipe(self, recipe: Recipe, strict: bool) -> None:
        """Apply the rules in order. A rule that matches nothing is named (a warning, an error with
        --strict) unless it is optional or its model_types exclude this checkpoint: those are silent.
        A recipe that reads a format first checks that config.json declares a scheme it supports."""
        if recipe.format is not None:
            try:
                formats.check_source(recipe.format, self.config)
            except MoeconvError as error:
                raise PlanError(f"{recipe.origin}: {error}") from None
        for rule in recipe.rules:
            self.apply_rule(rule, strict)

    def _unmatched(self, message: str, strict: bool) -> None:
        if strict:
            raise PlanError(message + " (--strict)")
        self.warnings.append(message)

    def left_in_format(self, recipes: list[Recipe], strict: bool) -> None:
        """Tensors still in the format a recipe reads: no rule took them (a weight without its scale,
        a scheme no rule names). They keep config.json's quantization_config; named here (an error
        with --strict), since a loader of the rest would not expect them."""
        for quant_method in dict.fromkeys(r.format for r in recipes if r.format):
            fmt = formats.FORMATS[quant_method]
            left = [key for key, entry in self.namespace.items() if fmt.holds(key, entry.node.dtype)]
            if left:
                more = f" and {len(left) - 3} more" if len(left) > 3 else ""
                shown = ", ".join(f"'{key}' ({self.namespace[key].node.dtype})" for key in left[:3])
                self._unmatched(
                    f"{shown}{more} still in {quant_method}: no rule converted {'it' if len(left) == 1 else 'them'}", strict
                )

    def apply_rule(self, rule: Rule, strict: bool) -> bool:
        """Apply one rule to the namespace; False when it matched nothing."""
        if rule.model_types and self.config.get("model_type") not in rule.model_types:
            return False
        matches = self._match(rule)
        if not matches:
            if not rule.optional:
                self._unmatched(f"{rule.where} matched no key", strict)
            return False
        consumed = [key for keys in matches.values() for key in keys.values()]
        produced: dict[str, Entry] = {}
        if not rule.drop:
            for groups, values in self._run(rule, matches):
                for value in values:
                    key = self._target(rule, groups, value)
                    if key in produced:
                        raise PlanError(f"{rule.where} writes '{key}' twice; put the split/unstack variable in 'target'")
                    layout = value.layout + ((f"{rule.layout} (rule '{rule.name}')",) if rule.layout else ())
                    produced[key] = Entry(value.node, value.sources, value.rules + (rule.name,), value.ops, layout)
        for key in consumed:
            del self.namespace[key]
        for key, entry in produced.items():
            if key in self.namespace:
                earlier = self.namespace[key]
                by = f"rule '{earlier.rules[-1]}'" if earlier.rules else "the source"
                raise PlanError(f"{rule.where} writes '{key}', which {by} already provides; two tensors cannot share a key")
            self.namespace[key] = entry
        return True

    def _match(self, rule: Rule) -> dict[str, dict[tuple, str]]:
        """input name -> (named group values -> key), keys taken from the current namespace. A drop
        rule pairs nothing: every key any input matches goes, whatever its groups."""
        found: dict[str, dict[tuple, str]] = {name: {} for name in rule.inputs}
        if rule.drop:
            for key in self.namespace:
                name = next((n for n, pattern in rule.inputs.items() if pattern.fullmatch(key)), None)
                if name is not None:
                    found[name][(("", key),)] = key
            return found if any(found.values()) else {}
        for key in self.namespace:
            for name, pattern in rule.inputs.items():
                match = pattern.fullmatch(key)
                if match is None:
                    continue
                groups = tuple(sorted(match.groupdict().items()))
                if groups in found[name]:
                    raise PlanError(f"{rule.where}: keys '{found[name][groups]}' and '{key}' give the same groups {dict(groups)}")
                found[name][groups] = key
        if not any(found.values()):
            return {}
        everything = set().union(*(set(v) for v in found.values()))
        if rule.unpaired == "keep":  # keys without every partner stay as they are
            complete = set.intersection(*(set(v) for v in found.values()))
            found = {name: {g: k for g, k in keys.items() if g in complete} for name, keys in found.items()}
            return found if complete else {}
        for name, keys in found.items():
            for groups in sorted(everything - set(keys)):
                partner = next(k[groups] for k in found.values() if groups in k)
                raise PlanError(f"{rule.where}: '{partner}' has no partner for input '{name}' (groups {dict(groups)})")
        return found

    def _run(self, rule: Rule, matches: dict[str, dict[tuple, str]]):
        """Yield (template groups, output values) per match set, or per group of match sets."""
        names = list(rule.inputs)
        group_sets = sorted(matches[names[0]], key=lambda g: natural_key(str(g)))

        def initial(groups: tuple) -> list[Value]:
            entries = [self.namespace[matches[name][groups]] for name in names]
            return [Value(entry.node, {}, entry.sources, entry.ops, entry.rules, entry.layout) for entry in entries]

        if rule.group is None:
            for groups in group_sets:
                yield dict(groups), self._steps(rule, rule.steps, initial(groups), where=matches[names[0]][groups])
            return
        split_at = rule.stack_index()
        for rest, members in self._members(rule, group_sets, matches[names[0]]):
            label = ", ".join(f"{k}={v}" for k, v in rest) or "all keys"
            per_member = [
                self._steps(rule, rule.steps[:split_at], initial(groups), where=matches[names[0]][groups]) for groups in members
            ]
            stacked = self._stack(rule, rule.steps[split_at], per_member, label)
            yield dict(rest), self._steps(rule, rule.steps[split_at + 1 :], stacked, where=label)

    def _members(self, rule: Rule, group_sets: list[tuple], keys: dict[tuple, str]):
        """Yield (the other groups, the match sets of members 0..count-1) per set of members that
        differ only in the rule's group; the count checked against config.json or the rule."""
        buckets: dict[tuple, dict[int, tuple]] = {}
        for groups in group_sets:
            rest = tuple((k, v) for k, v in groups if k != rule.group)
            value = dict(groups)[rule.group]
            if not is_number(value):
                raise PlanError(f"{rule.where}: group '{rule.group}' must be a number, got '{value}' in '{keys[groups]}'")
            bucket = buckets.setdefault(rest, {})
            if int(value) in bucket:
                raise PlanError(
                    f"{rule.where}: '{keys[groups]}' and '{keys[bucket[int(value)]]}' are both {rule.group} {int(value)}"
                )
            bucket[int(value)] = groups
        expected, why = self._expected_count(rule)
        for rest, members in sorted(buckets.items(), key=lambda kv: natural_key(str(kv[0]))):
            count = expected if expected is not None else max(members) + 1
            missing = _gaps(sorted(i for i in members if i < count), count)
            extra = [i for i in members if i >= count]
            label = ", ".join(f"{k}={v}" for k, v in rest) or "all keys"
            if missing:
                more = count - sum(1 for i in members if i < count) - len(missing)
                listed = _ranges(missing) + (f" and {more} more" if more else "")
                raise PlanError(
                    f"{rule.where}: {label}: {rule.group} {listed} missing for input '{next(iter(rule.inputs))}' "
                    f"(have {_ranges(sorted(members))}; expected {count}{why})"
                )
            if extra:
                raise PlanError(f"{rule.where}: {label}: {rule.group} {_ranges(extra)} beyond the expected {count}{why}")
            yield rest, [members[i] for i in range(count)]

    def _stack(self, rule: Rule, step: OpStep, per_member: list[list[Value]], where: str) -> list[Value]:
        """The stack step: the j-th value of every member stacked, for each j."""
        stacked = []
        for parts in zip(*per_member):
            node = self._op_node(rule, step, [p.node for p in parts], 0, where=where)
            sources = tuple(s for p in parts for s in p.sources)
            ops_done = parts[0].ops + (step.describe(self._params(step, rule)),)
            layout = tuple(dict.fromkeys(m for p in parts for m in p.layout))
            stacked.append(Value(node, parts[0].variables, sources, ops_done, parts[0].rules, layout))
        return stacked

    def _expected_count(self, rule: Rule) -> tuple[int | None, str]:
        if isinstance(rule.count, int):
            return rule.count, " from the rule's count"
        configs = [self.config, self.config.get("text_config") or {}]
        for name in rule.count or ():
            for config in configs:
                value = config.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    if value < 1:
                        raise PlanError(f"{rule.where}: config.json {name} = {value}; a count of members must be positive")
                    return value, f" from config.json {name}"
        return None, ""

    def _steps(self, rule: Rule, steps: tuple[OpStep, ...], values: list[Value], where: str) -> list[Value]:
        for step in steps:
            op = _op_arity(step.op)
            if op == 1:
                values = [out for value in values for out in self._unary(rule, step, value, where)]
            else:
                if op is not None and op != len(values):
                    raise PlanError(f"{rule.where}: op '{step.op}' takes {op} inputs, the chain has {len(values)} at '{where}'")
                node = self._op_node(rule, step, [v.node for v in values], 0, where)
                merged = {k: v for value in values for k, v in value.variables.items()}
                sources = tuple(s for value in values for s in value.sources)
                rules = tuple(dict.fromkeys(r for value in values for r in value.rules))
                described = step.describe(self._params(step, rule))
                layout = self._layout(rule, step, described, [m for value in values for m in value.layout])
                values = [Value(node, merged, sources, values[0].ops + (described,), rules, layout)]
        return values

    def _unary(self, rule: Rule, step: OpStep, value: Value, where: str) -> list[Value]:
        params = self._params(step, rule)
        outputs = self._infer(rule, step, params, [value.node], where)
        if step.names and len(step.names) != len(outputs):
            raise PlanError(
                f"{rule.where}: {step.op} makes {len(outputs)} tensors at '{where}', but {len(step.names)} names are given"
            )
        results = []
        for index, (dtype, shape) in enumerate(outputs):
            node = OpNode(step.op, params, [value.node], index, dtype, shape)
            variables = dict(value.variables)
            if len(outputs) > 1:
                label = step.names[index] if step.names else str(index)
                variables[step.fanout_var] = label
            described = step.describe(params)
            layout = self._layout(rule, step, described, list(value.layout))
            results.append(Value(node, variables, value.sources, value.ops + (described,), value.rules, layout))
        return results

    def _layout(self, rule: Rule, step: OpStep, described: str, before: list[str]) -> tuple[str, ...]:
        """Where a tensor's meaning stands after a step: an op that reorders rows or columns
        (`Op.reorders`: transpose, (de)interleave, concat, split) in a recipe that does not declare
        `consumer = "transformers"` takes it out of transformers' layout, whatever its shape; the same
        op applied again with its inverse right after brings it back."""
        if rule.consumer == "transformers" or not ops.get_op(step.op).reorders:
            return tuple(dict.fromkeys(before))
        mark = f"{described} (rule '{rule.name}')"
        inverse = ops.get_op(step.op).inverse
        if before and inverse and before[-1].startswith(described.replace(step.op, inverse, 1) + " "):
            return tuple(dict.fromkeys(before[:-1]))
        return tuple(dict.fromkeys([*before, mark]))

    def _op_node(self, rule: Rule, step: OpStep, inputs: list[Node], index: int, where: str) -> OpNode:
        params = self._params(step, rule)
        dtype, shape = self._infer(rule, step, params, inputs, where)[index]
        return OpNode(step.op, params, inputs, index, dtype, shape)

    def _infer(self, rule: Rule, step: OpStep, params: dict, inputs: list[Node], where: str):
        try:
            return infer_outputs(step.op, params, inputs)
        except MoeconvError as error:
            raise PlanError(f"{rule.where}: {where}: {error}") from None

    def _params(self, step: OpStep, rule: Rule | None = None) -> dict:
        """The step's parameters for this run: "$dtype" and "$config.a.b" values resolved."""
        params = {k: (self.dtype or DEFAULT_DTYPE if v == "$dtype" else v) for k, v in step.params.items()}
        from_config = {k for k, v in params.items() if isinstance(v, str) and v.startswith(CONFIG_PREFIX)}
        if not from_config:
            return params
        where = rule.where if rule else f"op '{step.op}'"
        for name in from_config:
            value: object = self.config
            for part in params[name].removeprefix(CONFIG_PREFIX).split("."):
                if not isinstance(value, dict) or part not in value:
                    raise PlanError(f"{where}: {step.op} parameter '{name}' = {params[name]}: config.json has no such value")
                value = value[part]
            params[name] = value
        try:
            return ops.check_params(step.op, params)
        except MoeconvError as error:
            raise PlanError(f"{where}: {error} (from config.json)") from None

    def _target(self, rule: Rule, groups: dict, value: Value) -> str:
        try:
            return render_template(rule.target, {**groups, **value.variables}, rule.maps)
        except KeyError as error:
            known = sorted({*groups, *value.variables})
            raise PlanError(
                f"{rule.where}: target uses {{{error.args[0]}}}, which is not defined here; available: {known}"
            ) from None
        except LookupError as error:
            table, missing = error.args
            raise PlanError(
                f"{rule.where}: maps.{table} has no entry for '{missing}' (known: {', '.join(rule.maps[table])})"
            ) from None

    # ---- after the rules --------------------------------------------------------------------------

    def cast_floats(self) -> None:
        """--dtype: every floating-point output in that dtype (exact ops already produce it), but
        1-byte floats (FP8, E8M0): those are quantized data, whose values mean nothing without
        their scales, so only a format's op may widen them."""
        if self.dtype is None:
            return
        params = {"dtype": self.dtype}
        for entry in self.namespace.values():
            node = entry.node
            if dtypes.is_float(node.dtype) and node.dtype != self.dtype and dtypes.itemsize(node.dtype) > 1:
                ((dtype, shape),) = infer_outputs("cast", params, [node])
                entry.node = OpNode("cast", params, [node], 0, dtype, shape)
                entry.ops += (f"cast(dtype={dtypes.SHORT_NAMES[self.dtype]})",)


def _op_arity(name: str) -> int | None:
    return ops.get_op(name).n_inputs


def _gaps(present: list[int], count: int, most: int = 8) -> list[int]:
    """The first `most` numbers of 0..count-1 not in sorted `present` (never enumerates count)."""
    found, expected = [], 0
    for value in [*present, count]:
        while expected < value and len(found) < most:
            found.append(expected)
            expected += 1
        if len(found) >= most:
            break
        expected = value + 1
    return found


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0..2, 5'."""
    spans, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            spans.append(str(start) if start == v else f"{start}..{v}")
            start = None
    return ", ".join(spans)


LAYOUT_MARKER = "moeconv_layouts"  # config.json: key families not in transformers' layout, and how


def _layout_families(tensors) -> dict[str, str]:
    """{key family (numeric segments collapsed): how it differs from transformers' layout}."""
    by_how: dict[str, list[str]] = {}
    for tensor in tensors:
        if tensor.layout:
            by_how.setdefault("; ".join(tensor.layout), []).append(tensor.key)
    return {pattern: how for how, keys in by_how.items() for pattern, _ in collapse_keys(keys)}


def _provenance(source: Checkpoint, recipes: list[Recipe], layouts: dict[str, str]) -> dict[str, str]:
    """Every shard's `__metadata__` (besides "format": "pt"): moeconv's version, the recipes by name
    and text hash, the layouts that are not transformers', and a hub source's repo and revision.
    Nothing that depends on the folder or the time: same inputs, same bytes."""
    named = [
        {
            "name": Path(r.origin).name if not r.origin.startswith("preset ") else r.origin,
            "sha256": hashlib.sha256(r.text.encode()).hexdigest()[:16],
        }
        for r in recipes
    ]
    metadata = {"moeconv.version": __version__, "moeconv.recipes": json.dumps(named, separators=(",", ":"))}
    if layouts:
        metadata["moeconv.layouts"] = json.dumps(layouts, separators=(",", ":"), sort_keys=True)
    if source.fetch is not None:  # a hub repo: "org/name@commit"
        metadata["moeconv.source"] = source.origin
    return metadata


def build_plan(
    source: Checkpoint,
    recipes: list[Recipe],
    *,
    dtype: str | None = None,
    align: int = 16,
    max_shard_size: int = 5 * 10**9,
    strict: bool = False,
) -> Plan:
    """Plan a conversion of `source` with `recipes` applied in order. Reads headers only.

    `dtype` (--dtype: "bf16", "fp16", "fp32", a long spelling, a safetensors name or a torch
    dtype) makes every floating output that dtype; `strict` turns rules that match nothing into
    errors. Raises PlanError at the first problem, naming the rule and key.
    """
    if dtype is not None and dtype not in dtypes.SHORT_NAMES:
        dtype = dtypes.parse_user_dtype(str(dtype).removeprefix("torch."))
    planner = _Planner(source, dtype)
    for recipe in recipes:
        planner.apply_recipe(recipe, strict)
    planner.left_in_format(recipes, strict)
    planner.cast_floats()

    tensors: dict[str, PlannedTensor] = {}
    for key in sorted(planner.namespace, key=natural_key):
        entry = planner.namespace[key]
        node = entry.node
        tensors[key] = PlannedTensor(
            key, node.dtype, node.shape, entry.sources, entry.rules, entry.ops, node, layout=entry.layout
        )
        if node.materializes:
            planner.warnings.append(
                f"'{key}' is computed whole in memory ({node.nbytes / 2**20:.1f} MiB): an op acts on its first axis"
            )
    specs = [TensorSpec(t.key, t.dtype, t.shape) for t in tensors.values()]
    layouts = _layout_families(tensors.values())
    shards = plan_shards(specs, max_shard_size, align, _provenance(source, recipes, layouts))
    for layout in shards:
        for key, offset in layout.offsets.items():
            tensors[key].shard, tensors[key].offset = layout.name, offset
        why = "no order of the shard's tensor sizes aligns more" if layout.best_order else "too many sizes to search every order"
        for key in layout.misaligned:
            planner.warnings.append(f"'{key}' in {layout.name} cannot start {align}-byte aligned ({why})")

    config = companions.output_config(source.config, tensors.values(), dtype)
    if config is not None and layouts:
        config[LAYOUT_MARKER] = layouts
    return Plan(
        source=source,
        recipes=list(recipes),
        tensors=tensors,
        shards=shards,
        config=config,
        companion_files=companions.companion_files(source.root, source.listing),
        warnings=planner.warnings,
        align=align,
        max_shard_size=max_shard_size,
        dtype=dtype,
    )
