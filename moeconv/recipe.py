"""Recipes: ordered, regex-matched rules read from TOML (built-in presets or user files).

A recipe file is a `description`, optionally the `consumer` its rules reproduce and the `format`
(quant_method) it reads, and a list of `[[rule]]` tables:

    [[rule]]
    name = "fuse gate + up"                       # optional, defaults to "rule N"
    inputs = { gate = '(?P<layer>.+)\\.experts\\.(?P<expert>\\d+)\\.w1\\.weight',
               up = '(?P<layer>.+)\\.experts\\.(?P<expert>\\d+)\\.w3\\.weight' }
    group = "expert"                              # collect members that differ only in this group
    count = ["num_local_experts", "num_experts"]  # config.json keys giving the member count (or an int)
    ops = [{ op = "concat", dim = 0 }, { op = "stack", dim = 0 }]
    target = "{layer}.gate_up_proj"

`match = 'regex'` is the one-input shorthand of `inputs`. Patterns match the WHOLE key. Named groups
become template variables for `target`; a `split` or `unstack` op adds one more (`as = "part"`,
values from `names` or the index). `drop = true` removes the matched keys. `model_types` limits a
rule to configs of those model types; `optional = true` marks one of several alternatives (key
families) that may match nothing without a warning. Op parameters are checked against the op's signature
(moeconv.ops); the string "$dtype" stands for the run's --dtype (bf16 when not given).
"""

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import re2

import moeconv.formats  # noqa: F401  (registers the formats' ops, which recipes name)
from moeconv import dtypes, ops
from moeconv.errors import RecipeError

# Keys an op entry may carry besides the op's own parameters: they steer the planner.
OP_META_KEYS = {"op", "as", "names"}
RULE_KEYS = {
    "name",
    "description",
    "match",
    "inputs",
    "group",
    "count",
    "ops",
    "target",
    "drop",
    "model_types",
    "optional",
    "unpaired",
    "layout",
    "maps",
}
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the refusal is our one-line error, not a log line on stderr
CONFIG_PREFIX = "$config."  # an op parameter's value taken from config.json, e.g. "$config.quantization_config.weight_block_size"
RECIPE_KEYS = {"description", "consumer", "format", "rule"}
CONSUMERS = ("transformers",)  # a recipe that declares one reproduces that loader's own conversions


@dataclass(frozen=True)
class OpStep:
    """One op of a rule's chain: the registered op, its checked parameters, fan-out naming."""

    op: str
    params: dict
    fanout_var: str | None = None  # template variable set by split/unstack
    names: tuple[str, ...] | None = None  # values of that variable (split parts)

    def describe(self, params: dict | None = None) -> str:
        """'transpose(dim0=1, dim1=2)', with `params` (resolved "$dtype") when given; a long list
        as its first values and its length (every output tensor's `ops` carries this text)."""
        args = ", ".join(f"{k}={_shown(v)}" for k, v in (params or self.params).items())
        return f"{self.op}({args})"


def _shown(value: object) -> object:
    if isinstance(value, str):
        return dtypes.SHORT_NAMES.get(value, value)
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:4]))}, ... ({len(value)} values)]"
    return value


@dataclass(frozen=True)
class Rule:
    """One validated rule. `inputs` keeps the declared order: ops consume inputs in that order."""

    name: str
    origin: str  # "preset fuse-experts" or the file path, for messages
    inputs: dict[str, "re2._Regexp"]  # compiled by RE2: linear-time matching
    target: str | None
    steps: tuple[OpStep, ...] = ()
    group: str | None = None
    count: tuple[str, ...] | int | None = None
    drop: bool = False
    model_types: tuple[str, ...] | None = None
    optional: bool = False  # one of several alternatives (key families): matching nothing is fine
    unpaired: str = "error"  # a key that matches one input but has no partner: "error", or "keep" it as it is
    layout: str | None = None  # its outputs are in this named layout, not the consumer's (e.g. "gate-up-halves")
    maps: dict[str, dict[str, str]] = field(default_factory=dict)  # for {name|map} in target
    consumer: str | None = None  # the recipe's declared consumer: its reordering ops are that loader's layout
    description: str = ""

    @property
    def where(self) -> str:
        return f"{self.origin}: rule '{self.name}'"

    def stack_index(self) -> int | None:
        """Position of the `stack` step in the chain, or None."""
        return next((i for i, s in enumerate(self.steps) if s.op == "stack"), None)


@dataclass(frozen=True)
class Recipe:
    """An ordered list of rules from one TOML source."""

    origin: str
    description: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    text: str = ""  # the TOML it was parsed from: the report keeps it so `moeconv verify` can re-plan
    consumer: str | None = None  # "transformers": its rules reproduce transformers' own conversions
    format: str | None = None  # quant_method of the format it reads: the source's config.json must declare it


def _fail(where: str, message: str) -> RecipeError:
    return RecipeError(f"{where}: {message}")


def _compile(where: str, field_name: str, pattern: object):
    """A rule's regex, compiled for RE2: matching takes time linear in the key whatever the pattern
    (Python's engine backtracks: `(a+)+b` against 41 a's would take hours). Python's parser first,
    for its clearer syntax errors."""
    if not isinstance(pattern, str):
        raise _fail(where, f"field '{field_name}' must be a regex string")
    try:
        re.compile(pattern)
    except re.error as error:
        raise _fail(where, f"field '{field_name}': regex does not compile: {error}") from None
    except RecursionError:
        raise _fail(where, f"field '{field_name}': regex nests groups too deeply") from None
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as error:
        why = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) else error
        raise _fail(
            where,
            f"field '{field_name}': regex needs backtracking (lookaround or a backreference: {why}); rules match in linear time",
        ) from None


def _parse_step(where: str, index: int, entry: object) -> OpStep:
    at = f"{where}, ops[{index}]"
    if not isinstance(entry, dict) or "op" not in entry:
        raise _fail(at, "each op must be a table with an 'op' field, e.g. { op = \"transpose\", dim0 = 1, dim1 = 2 }")
    name = entry["op"]
    try:
        ops.get_op(name)
    except RecipeError as error:
        raise _fail(at, str(error)) from None
    params = {k: v for k, v in entry.items() if k not in OP_META_KEYS}
    names = entry.get("names")
    fanout_var = entry.get("as")
    fanout = ops.get_op(name).fanout
    if (names is not None or fanout_var is not None) and fanout is None:
        several = sorted(n for n, op in ops.OPS.items() if op.fanout)
        raise _fail(at, f"'as' and 'names' only go with ops that make several tensors ({', '.join(several)}), not '{name}'")
    if names is not None:
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise _fail(at, '\'names\' must be a list of strings, e.g. ["gate", "up"]')
        if name == "split":
            count = (
                len(params["sizes"])
                if isinstance(params.get("sizes"), list) and params["sizes"]
                else params.get("parts", len(names))
            )
            if count != len(names):
                raise _fail(at, f"{count} pieces but {len(names)} names given")
            if not params.get("sizes"):
                params["parts"] = len(names)
    if fanout_var is not None and not (isinstance(fanout_var, str) and fanout_var.isidentifier()):
        raise _fail(at, "'as' must name a template variable, e.g. as = \"part\"")
    if fanout is not None and fanout_var is None:
        fanout_var = fanout
    dtype_param = {k for k, v in params.items() if v == "$dtype"}
    from_config = frozenset(k for k, v in params.items() if isinstance(v, str) and v.startswith(CONFIG_PREFIX))
    probe = {k: ("bf16" if k in dtype_param else v) for k, v in params.items()}
    try:
        checked = ops.check_params(name, probe, deferred=from_config)
    except RecipeError as error:
        raise _fail(at, str(error)) from None
    checked.update({k: "$dtype" for k in dtype_param})
    return OpStep(name, checked, fanout_var, tuple(names) if names else None)


def _parse_inputs(where: str, table: dict) -> dict:
    """`match` (one input, named x) or `inputs` (named), compiled; all with the same named groups."""
    if ("match" in table) == ("inputs" in table):
        raise _fail(where, "give exactly one of 'match' (one input) or 'inputs' (named inputs)")
    if "match" in table:
        inputs = {"x": _compile(where, "match", table["match"])}
    else:
        if not isinstance(table["inputs"], dict) or not table["inputs"]:
            raise _fail(where, "field 'inputs' must be a table of name = 'regex'")
        inputs = {k: _compile(where, f"inputs.{k}", v) for k, v in table["inputs"].items()}
    group_names = [set(p.groupindex) for p in inputs.values()]
    if any(g != group_names[0] for g in group_names):
        raise _fail(where, "all 'inputs' patterns must have the same named groups, so their matches can be paired")
    return inputs


# A target template: literal text, {{ and }} for braces, {name} (a named group or fan-out variable)
# and {name|map} (its value looked up in the rule's `maps.map`). Nothing else: no attribute, index
# or format spec, so a key can only be made of what the matched keys and the recipe say.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)(?:\|([A-Za-z_][A-Za-z0-9_]*))?\}|[{}]")


def template_parts(template: str) -> list[str | tuple[str, str | None]]:
    """Literal strings and (name, map or None) placeholders; ValueError on anything else in braces."""
    parts: list[str | tuple[str, str | None]] = []
    position = 0
    for match in _PLACEHOLDER.finditer(template):
        parts.append(template[position : match.start()])
        token = match.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif match.group(1) is None:
            raise ValueError(f"'{token}' at character {match.start()}: use {{name}} or {{name|map}}, or {{{{ }}}} for a brace")
        else:
            parts.append((match.group(1), match.group(2)))
        position = match.end()
    parts.append(template[position:])
    return [p for p in parts if p != ""]


def render_template(template: str, values: dict[str, str], maps: dict[str, dict[str, str]]) -> str:
    """The key a target template makes from these values; KeyError (the name) for an undefined one,
    LookupError (map, value) for a value its map lacks."""
    out = []
    for part in template_parts(template):
        if isinstance(part, str):
            out.append(part)
            continue
        name, table = part
        value = values[name]
        if table is not None:
            if value not in maps[table]:
                raise LookupError(table, value)
            value = maps[table][value]
        out.append(value)
    return "".join(out)


def _parse_maps(where: str, table: dict) -> dict[str, dict[str, str]]:
    maps = table.get("maps", {})
    if not isinstance(maps, dict) or not all(
        isinstance(m, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()) for m in maps.values()
    ):
        raise _fail(where, "field 'maps' must be tables of strings, e.g. maps.mlp = { gate_up_proj = \"mlp1\" }")
    return maps


def _parse_target(where: str, table: dict, steps: tuple[OpStep, ...]) -> tuple[str | None, bool]:
    """(target template, drop)."""
    drop = table.get("drop", False)
    if not isinstance(drop, bool):
        raise _fail(where, "field 'drop' must be true or false")
    target = table.get("target")
    if drop and (target is not None or steps):
        raise _fail(where, "a rule with drop = true takes no 'target' or 'ops'")
    if not drop:
        if not isinstance(target, str) or not target:
            raise _fail(where, "field 'target' is required: a key template such as '{prefix}.gate_up_proj'")
        try:
            placeholders = [p for p in template_parts(target) if not isinstance(p, str)]
        except ValueError as error:
            raise _fail(where, f"field 'target' is not a valid template: {error}") from None
        maps = _parse_maps(where, table)
        for name, map_name in placeholders:
            if map_name is not None and map_name not in maps:
                raise _fail(where, f"target uses {{{name}|{map_name}}} but the rule has no maps.{map_name}")
    return target, drop


def _parse_group(where: str, table: dict, groups: set[str], steps: tuple[OpStep, ...]) -> tuple[str | None, tuple | int | None]:
    """(group, count): the named group whose members one `stack` op merges, and how many there are."""
    group = table.get("group")
    stacks = [s for s in steps if s.op == "stack"]
    if group is not None:
        if group not in groups:
            raise _fail(where, f"field 'group' = '{group}' is not a named group of the pattern(s)")
        if len(stacks) != 1:
            raise _fail(where, "a rule with 'group' needs exactly one { op = \"stack\" } to merge the members")
    elif stacks:
        raise _fail(where, "op 'stack' needs the rule's 'group' field (which named group to merge over)")
    count = table.get("count")
    if count is not None:
        if isinstance(count, str):
            count = (count,)
        elif isinstance(count, list) and all(isinstance(c, str) for c in count):
            count = tuple(count)
        elif not (isinstance(count, int) and count > 0):
            raise _fail(where, "field 'count' must be a config key, a list of config keys, or a positive integer")
        if group is None:
            raise _fail(where, "field 'count' only goes with 'group'")
    return group, count


def _parse_rule(origin: str, index: int, table: object) -> Rule:
    where = f"{origin}: rule {index + 1}"
    if not isinstance(table, dict):
        raise _fail(where, "each [[rule]] must be a table")
    name = table.get("name", f"rule {index + 1}")
    if not isinstance(name, str):
        raise _fail(where, "field 'name' must be a string")
    where = f"{origin}: rule {index + 1} ('{name}')" if "name" in table else where
    unknown = set(table) - RULE_KEYS
    if unknown:
        raise _fail(where, f"unknown field '{sorted(unknown)[0]}'; rule fields are: {', '.join(sorted(RULE_KEYS))}")
    inputs = _parse_inputs(where, table)
    raw_ops = table.get("ops", [])
    if not isinstance(raw_ops, list):
        raise _fail(where, "field 'ops' must be a list of op tables")
    steps = tuple(_parse_step(where, i, entry) for i, entry in enumerate(raw_ops))
    groups = set(next(iter(inputs.values())).groupindex)
    for i, step in enumerate(steps):
        if step.fanout_var in groups:
            raise _fail(
                where,
                f"ops[{i}]: {step.op} names its pieces '{step.fanout_var}', a named group of the pattern too; pick another with as = \"...\"",
            )
    target, drop = _parse_target(where, table, steps)
    group, count = _parse_group(where, table, set(next(iter(inputs.values())).groupindex), steps)
    model_types = table.get("model_types")
    if model_types is not None:
        if not (isinstance(model_types, list) and all(isinstance(m, str) for m in model_types)):
            raise _fail(where, "field 'model_types' must be a list of strings")
        model_types = tuple(model_types)
    optional = table.get("optional", False)
    if not isinstance(optional, bool):
        raise _fail(where, "field 'optional' must be true or false")
    layout = table.get("layout")
    if layout is not None and not (isinstance(layout, str) and layout):
        raise _fail(where, "field 'layout' must name the layout the rule's outputs are in, e.g. \"gate-up-halves\"")
    unpaired = table.get("unpaired", "error")
    if unpaired not in ("error", "keep"):
        raise _fail(where, 'field \'unpaired\' must be "error" or "keep" (leave a key without partners as it is)')
    return Rule(
        name=name,
        origin=origin,
        inputs=inputs,
        target=target,
        steps=steps,
        group=group,
        count=count,
        drop=drop,
        model_types=model_types,
        optional=optional,
        unpaired=unpaired,
        layout=layout,
        maps=_parse_maps(where, table),
        description=table.get("description", ""),
    )


def parse_recipe(text: str, origin: str) -> Recipe:
    """Parse and validate recipe TOML text; `origin` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{origin}: not valid TOML: {error}") from None
    except RecursionError:
        raise RecipeError(f"{origin}: TOML nested too deeply to be a recipe") from None
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise RecipeError(f"{origin}: unknown top-level field '{sorted(unknown)[0]}'; use {', '.join(sorted(RECIPE_KEYS))}")
    rules = data.get("rule", [])
    if not isinstance(rules, list) or not rules:
        raise RecipeError(f"{origin}: no [[rule]] tables")
    consumer = data.get("consumer")
    if consumer is not None and consumer not in CONSUMERS:
        raise RecipeError(f"{origin}: consumer = {consumer!r} is not one moeconv knows; known: {', '.join(CONSUMERS)}")
    fmt = data.get("format")
    if fmt is not None and fmt not in moeconv.formats.FORMATS:
        known = ", ".join(sorted(moeconv.formats.FORMATS))
        raise RecipeError(f"{origin}: format = {fmt!r} is not one moeconv reads; known: {known}")
    parsed = tuple(dataclasses.replace(_parse_rule(origin, i, r), consumer=consumer) for i, r in enumerate(rules))
    return Recipe(origin, data.get("description", ""), parsed, text, consumer, fmt)


def load_recipe(path: str | Path) -> Recipe:
    """Read a user recipe file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecipeError(f"{path}: cannot read recipe: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: recipe is not UTF-8 text (byte {error.start}); TOML files are UTF-8") from None
    return parse_recipe(text, str(path))


def _presets_folder() -> Path:
    # Next to this file, not resources.files("moeconv"): run from the folder that holds a clone named
    # moeconv, an editable install's package is shadowed by that folder as a namespace package (the
    # path finder sees it before the install's import hook), so "moeconv" would be the clone's root.
    return Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    """Names of the built-in presets (TOML files shipped in moeconv/presets)."""
    return sorted(p.name.removesuffix(".toml") for p in _presets_folder().iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    """The TOML text of a built-in preset."""
    if name not in preset_names():
        raise RecipeError(f"unknown preset '{name}'; known presets: {', '.join(preset_names())}")
    return _presets_folder().joinpath(f"{name}.toml").read_text(encoding="utf-8")


def load_preset(name: str) -> Recipe:
    """A built-in preset as a Recipe."""
    return parse_recipe(preset_text(name), f"preset {name}")
