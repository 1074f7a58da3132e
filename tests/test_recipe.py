"""Recipe validation: every mistake is named by file, rule and field, with the fix."""

import tomllib

import pytest
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.errors import RecipeError
from moeconv.recipe import load_preset, load_recipe, parse_recipe, preset_names, preset_text

GOOD_RULE = """
[[rule]]
name = "swap"
match = '(?P<p>.+)\\.weight'
ops = [{ op = "transpose", dim0 = 0, dim1 = 1 }]
target = "{p}.weight_t"
"""


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, "mine.toml")
    return str(caught.value)


def test_good_recipe_parses_with_checked_params():
    recipe = parse_recipe(GOOD_RULE, "mine.toml")
    (rule,) = recipe.rules
    assert rule.name == "swap"
    assert rule.steps[0].op == "transpose"
    assert rule.steps[0].params == {"dim0": 0, "dim1": 1}
    assert rule.inputs["x"].fullmatch("a.b.weight").group("p") == "a.b"


def test_unknown_op_names_file_rule_and_known_ops():
    text = GOOD_RULE + GOOD_RULE + GOOD_RULE.replace('"transpose"', '"transpos"').replace('"swap"', '"third"')
    message = _error(text)
    assert message.startswith("mine.toml: rule 3 ('third'), ops[0]: ")
    assert "unknown op 'transpos'" in message
    assert "transpose" in message and "concat" in message  # the known ops are listed


def test_bad_op_parameter_is_named():
    message = _error(GOOD_RULE.replace("dim0 = 0", "dims = 0"))
    assert "mine.toml: rule 1 ('swap'), ops[0]" in message
    assert "dims" in message


def test_regex_that_does_not_compile():
    message = _error(GOOD_RULE.replace("(?P<p>.+)", "(?P<p>.+"))
    assert "mine.toml: rule 1 ('swap'): field 'match': regex does not compile" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.replace('target = "{p}.weight_t"', ""), "field 'target' is required"),
        (lambda t: t.replace('name = "swap"', 'nmae = "swap"'), "unknown field 'nmae'"),
        (lambda t: t + "group = 'p'\n", 'needs exactly one { op = "stack" }'),
        (lambda t: t.replace("ops = [", 'ops = [{ op = "stack" }, '), "op 'stack' needs the rule's 'group' field"),
        (
            lambda t: t.replace("match = '(?P<p>.+)\\.weight'", "inputs = { a = '(?P<p>.+)', b = '(?P<q>.+)' }"),
            "same named groups",
        ),
        (lambda t: t + "drop = true\n", "drop = true takes no 'target' or 'ops'"),
        (lambda t: t + "count = 8\n", "'count' only goes with 'group'"),
        (
            lambda t: t.replace('{ op = "transpose", dim0 = 0, dim1 = 1 }', '{ op = "transpose", dim0 = 0, dim1 = 1, as = "x" }'),
            "'as' and 'names' only go with",
        ),
    ],
)
def test_rule_field_errors(change, expected):
    message = _error(change(GOOD_RULE))
    assert message.startswith("mine.toml: rule 1")
    assert expected in message


def test_not_toml_and_no_rules():
    assert _error("[[rule]\n").startswith("mine.toml: not valid TOML")
    assert _error("description = 'x'\n") == "mine.toml: no [[rule]] tables"


def test_recipe_file_errors_name_the_path(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD_RULE.replace('"transpose"', '"nope"'))
    with pytest.raises(RecipeError, match=f"^{bad}: rule 1"):
        load_recipe(bad)


def test_split_names_set_parts_and_fanout_variable():
    recipe = parse_recipe(
        """
[[rule]]
match = '(?P<p>.+)\\.gate_up'
ops = [{ op = "split", dim = 0, names = ["gate", "up"], as = "part" }]
target = "{p}.{part}"
""",
        "split.toml",
    )
    step = recipe.rules[0].steps[0]
    assert step.params["parts"] == 2 and step.names == ("gate", "up") and step.fanout_var == "part"


def test_every_preset_parses_and_shows():
    names = preset_names()
    assert {
        "fuse-experts",
        "unfuse-experts",
        "gpt-oss-bf16",
        "gpt-oss-deinterleaved",
        "gpt-oss-out-in",
        "gpt-oss-mxfp4-deinterleaved",
    } <= set(names)
    runner = CliRunner()
    listing = runner.invoke(app, ["presets"])
    assert listing.exit_code == 0
    for name in names:
        recipe = load_preset(name)
        assert recipe.description and recipe.rules
        assert any(line.startswith(name) and recipe.description[:40] in line for line in listing.stdout.splitlines())
        shown = runner.invoke(app, ["presets", "show", name])
        assert shown.exit_code == 0
        assert tomllib.loads(shown.stdout) == tomllib.loads(preset_text(name))


def test_unknown_preset_is_one_line_exit_1():
    result = CliRunner().invoke(app, ["presets", "show", "fuse-expert"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown preset 'fuse-expert'" in result.stderr and "fuse-experts" in result.stderr


def test_ops_listing_names_every_op_with_its_parameters_and_inverse():
    from moeconv.ops import OPS

    result = CliRunner().invoke(app, ["ops"])
    assert result.exit_code == 0
    for op in OPS.values():
        assert op.signature() in result.stdout
    assert "transpose(x: torch.Tensor, *, dim0: int, dim1: int) -> torch.Tensor  (inverse: transpose)" in result.stdout


def test_ops_listing_in_a_fresh_process_includes_the_formats_ops():
    """In one test session every module is imported already; a fresh `moeconv ops` must import the formats itself."""
    import subprocess
    import sys

    listing = subprocess.run([sys.executable, "-m", "moeconv", "ops"], capture_output=True, text=True, check=True).stdout
    for name in ("dequantize-mxfp4(", "quantize-mxfp4(", "dequantize-fp8-block("):
        assert name in listing, listing
