"""The load report against transformers itself: planned outputs are derived from transformers' own
meta models and save_pretrained files, never from moeconv.report."""

import json
import sys
import time

import pytest
import torch
from rich.console import Console

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig  # noqa: E402

from moeconv.dtypes import to_safetensors  # noqa: E402
from moeconv.report import (  # noqa: E402
    TRANSFORMERS_MISSING,
    LoadReport,
    Mismatch,
    check_load,
    expected_tensors,
    render_report,
)

SMALL = dict(
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
MXFP4 = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def qwen3_moe(**kw) -> dict:
    return Qwen3MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=32, head_dim=16, **kw).to_dict()


def mixtral(**kw) -> dict:
    return MixtralConfig(**SMALL, num_local_experts=4, **kw).to_dict()


def gpt_oss(quantized: bool = False, **kw) -> dict:
    config = GptOssConfig(**SMALL, num_local_experts=4, head_dim=16, **kw).to_dict()
    if quantized:
        config["quantization_config"] = dict(MXFP4)
    return config


CONFIGS = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "gpt_oss": gpt_oss}


def meta_planned(config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """What a transformers model holds, straight from transformers on the meta device."""
    config_obj = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_obj)
    return {k: (to_safetensors(t.dtype), tuple(t.shape)) for k, t in model.state_dict().items()}


def saved_planned(config: dict, tmp_path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The key/dtype/shape list of a checkpoint written by transformers' own save_pretrained."""
    config_obj = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config_obj).save_pretrained(tmp_path)
    planned = {}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            planned[key] = (piece.get_dtype(), tuple(piece.get_shape()))
    return planned


def mxfp4_hub_layout(config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The gpt-oss MXFP4 layout as it is on the hub (DESIGN.md table), derived from the bf16 keys."""
    E, H, I = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]  # noqa: E741
    table = {
        "gate_up_proj": {"gate_up_proj_blocks": [E, 2 * I, H // 32, 16], "gate_up_proj_scales": [E, 2 * I, H // 32]},
        "down_proj": {"down_proj_blocks": [E, H, I // 32, 16], "down_proj_scales": [E, H, I // 32]},
    }
    planned = {}
    for key, entry in meta_planned(config).items():
        prefix, _, name = key.rpartition(".")
        if name in table and ".experts" in prefix:
            planned.update({f"{prefix}.{k}": ("U8", tuple(shape)) for k, shape in table[name].items()})
        else:
            planned[key] = ("BF16", entry[1])
    return planned


# --- clean loads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_models_own_keys_are_clean(name):
    config = CONFIGS[name]()
    report = check_load(meta_planned(config), config)
    assert report.checked and report.reason is None
    assert report.ok(), report.to_json()
    assert report.consumer.startswith(f"transformers {transformers.__version__} ")


def test_floating_dtype_differences_are_not_mismatches():
    config = qwen3_moe()  # model in F32
    planned = {k: ("BF16", shape) for k, (_, shape) in meta_planned(config).items()}
    assert check_load(planned, config).ok()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_per_expert_checkpoint_from_save_pretrained_is_clean(name, tmp_path):
    config = CONFIGS[name]()
    planned = saved_planned(config, tmp_path)
    assert any(".experts.0." in k for k in planned)  # transformers wrote per-expert keys
    report = check_load(planned, config)
    assert report.ok(), report.to_json()


def test_checkpoint_saved_without_the_base_model_prefix_is_clean():
    config = mixtral()
    planned = {k.removeprefix("model."): v for k, v in meta_planned(config).items()}
    assert check_load(planned, config).ok()


# --- problems ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_key_removed_is_exactly_missing(name):
    config = CONFIGS[name]()
    planned = meta_planned(config)
    del planned["model.layers.1.post_attention_layernorm.weight"]
    report = check_load(planned, config)
    assert report.missing == ["model.layers.1.post_attention_layernorm.weight"]
    assert report.unexpected == [] and report.mismatched == [] and not report.ok()


def test_a_foreign_key_is_exactly_unexpected():
    config = gpt_oss()
    planned = meta_planned(config) | {"model.layers.0.mlp.experts.gate_up_proj_scales": ("U8", (4, 64, 2))}
    report = check_load(planned, config)
    assert report.unexpected == ["model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert report.missing == [] and report.mismatched == []


def test_a_changed_shape_is_mismatched_with_both_shapes():
    config = gpt_oss()
    planned = meta_planned(config)
    key = "model.layers.1.mlp.experts.gate_up_proj"
    planned[key] = ("BF16", (4, 64, 32))  # model: [E, H, 2I] = [4, 64, 64]
    report = check_load(planned, config)
    assert report.mismatched == [Mismatch(key, {"shape": [4, 64, 64], "dtype": "F32"}, {"shape": [4, 64, 32], "dtype": "BF16"})]
    assert report.missing == [] and report.unexpected == []


def test_integer_tensor_under_a_float_name_is_mismatched():
    config = qwen3_moe()
    planned = meta_planned(config)
    key = "model.layers.0.mlp.gate.weight"
    planned[key] = ("U8", planned[key][1])
    report = check_load(planned, config)
    assert [m.key for m in report.mismatched] == [key]
    assert report.mismatched[0].actual["dtype"] == "U8" and report.mismatched[0].expected["dtype"] == "F32"


def test_integer_per_expert_tensor_is_mismatched_under_its_fused_name(tmp_path):
    config = mixtral()
    planned = saved_planned(config, tmp_path)
    source = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    planned[source] = ("I8", planned[source][1])
    report = check_load(planned, config)
    assert [m.key for m in report.mismatched] == ["model.layers.1.mlp.experts.down_proj"]
    assert report.mismatched[0].actual == {"shape": [64, 32], "dtype": "I8", "source": source}


def test_a_missing_expert_in_a_per_expert_checkpoint_is_reported(tmp_path):
    config = mixtral()
    planned = saved_planned(config, tmp_path)
    del planned["model.layers.0.block_sparse_moe.experts.3.w1.weight"]
    report = check_load(planned, config)
    assert not report.ok()
    assert "model.layers.0.mlp.experts.gate_up_proj" in report.conversion_errors
    assert "model.layers.1.mlp.experts.gate_up_proj" not in report.missing


# --- transformers' forgiving rules -----------------------------------------------------------------


def test_tied_lm_head_absent_is_not_missing():
    config = mixtral(tie_word_embeddings=True)
    planned = meta_planned(config)
    del planned["lm_head.weight"]
    assert check_load(planned, config).ok()


def test_tying_is_symmetric_like_from_pretrained():
    config = mixtral(tie_word_embeddings=True)
    planned = meta_planned(config)
    del planned["model.embed_tokens.weight"]
    assert check_load(planned, config).ok()


def test_untied_lm_head_absent_is_missing():
    config = mixtral(tie_word_embeddings=False)
    planned = meta_planned(config)
    del planned["lm_head.weight"]
    assert check_load(planned, config).missing == ["lm_head.weight"]


def test_stale_rotary_inv_freq_is_ignored_as_transformers_does():
    config = qwen3_moe()
    planned = meta_planned(config) | {"model.layers.0.self_attn.rotary_emb.inv_freq": ("F32", (8,))}
    assert check_load(planned, config).ok()


# --- quantization ---------------------------------------------------------------------------------


def test_mxfp4_expected_tensors_are_the_hub_layout():
    config = gpt_oss(quantized=True)
    expected, consumer = expected_tensors(config)
    assert "mxfp4" in consumer
    hub = mxfp4_hub_layout(config)
    assert set(expected) == set(hub)
    for key, (dtype, shape) in hub.items():
        assert expected[key][1] == shape, key
        if dtype == "U8":
            assert expected[key][0] == "U8", key


def test_mxfp4_blocks_and_scales_are_clean():
    config = gpt_oss(quantized=True)
    report = check_load(mxfp4_hub_layout(config), config)
    assert report.ok(), report.to_json()


def test_bf16_experts_under_an_mxfp4_config_are_reported():
    config = gpt_oss(quantized=True)
    report = check_load(meta_planned(config), config)  # bf16 gate_up_proj / down_proj
    assert report.unexpected == [
        f"model.layers.{layer}.mlp.experts.{name}" for layer in (0, 1) for name in ("down_proj", "gate_up_proj")
    ]
    assert report.missing == [
        f"model.layers.{layer}.mlp.experts.{name}_{part}"
        for layer in (0, 1)
        for name in ("down_proj", "gate_up_proj")
        for part in ("blocks", "scales")
    ]


def test_dequantized_config_expects_bf16_experts():
    expected, consumer = expected_tensors(gpt_oss())
    assert expected["model.layers.0.mlp.experts.gate_up_proj"][1] == (4, 64, 64)  # [E, H, 2I]
    assert expected["model.layers.0.mlp.experts.down_proj"][1] == (4, 32, 64)  # [E, I, H]
    assert "mxfp4" not in consumer


def test_unknown_quant_method_is_not_checked():
    config = qwen3_moe()
    config["quantization_config"] = {"quant_method": "made_up"}
    report = check_load(meta_planned(config), config)
    assert not report.checked and not report.ok()
    assert "made_up" in report.reason


# --- not checkable --------------------------------------------------------------------------------


def test_transformers_missing_is_not_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` -> ImportError
    report = check_load({"a.weight": ("BF16", (2,))}, qwen3_moe())
    assert report == LoadReport(False, TRANSFORMERS_MISSING, None, [], [], [])
    assert not report.ok()


def test_unknown_model_type_is_not_checked():
    report = check_load({}, {"model_type": "foo"})
    assert not report.checked
    assert report.reason == f"model_type 'foo' is unknown to transformers {transformers.__version__}"


def test_no_config_is_not_checked():
    report = check_load({}, None)
    assert not report.checked and report.reason


# --- in the background (a conversion overlaps it with its data path) -----------------------------


# --- rendering and json ---------------------------------------------------------------------------


def render(report: LoadReport) -> str:
    console = Console(width=200, record=True, color_system=None)
    render_report(report, console)
    return console.export_text()


def test_render_collapses_keys_and_names_each_status():
    config = gpt_oss()
    planned = meta_planned(config)
    for layer in (0, 1):
        planned[f"model.layers.{layer}.mlp.experts.gate_up_proj_scales"] = ("U8", (4, 64, 2))
        planned[f"model.layers.{layer}.mlp.experts.down_proj"] = ("BF16", (4, 64, 32))
        del planned[f"model.layers.{layer}.mlp.router.bias"]
    text = render(check_load(planned, config))
    assert "model.layers.{0...1}.mlp.experts.gate_up_proj_scales" in text
    assert "model.layers.{0...1}.mlp.router.bias" in text
    assert "model.layers.{0...1}.mlp.experts.down_proj " in text
    for word in ("UNEXPECTED", "MISSING", "MISMATCHED", "[4, 64, 32]", "[4, 32, 64]"):
        assert word in text


def test_render_clean_and_not_checked_lines():
    config = qwen3_moe()
    assert "clean" in render(check_load(meta_planned(config), config))
    text = render(check_load({}, {"model_type": "foo"}))
    assert "not checked" in text and "model_type 'foo'" in text


def test_to_json_is_json():
    config = gpt_oss()
    planned = meta_planned(config)
    planned["model.norm.weight"] = ("BF16", (3,))
    data = json.loads(json.dumps(check_load(planned, config).to_json()))
    assert data["checked"] is True and data["ok"] is False
    assert data["mismatched"] == [
        {
            "key": "model.norm.weight",
            "expected": {"shape": [64], "dtype": "F32"},
            "actual": {"shape": [3], "dtype": "BF16"},
        }
    ]


# --- performance ----------------------------------------------------------------------------------


def test_gpt_oss_120b_shaped_config_is_checked_in_seconds():
    config = GptOssConfig(
        num_hidden_layers=36,
        num_local_experts=128,
        hidden_size=2880,
        intermediate_size=2880,
        vocab_size=201088,
        head_dim=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        dtype="bfloat16",
    ).to_dict()
    config["quantization_config"] = dict(MXFP4)
    start = time.perf_counter()
    expected, _ = expected_tensors(config)
    report = check_load(expected, config)
    elapsed = time.perf_counter() - start
    assert report.ok()
    assert expected["model.layers.35.mlp.experts.gate_up_proj_blocks"] == ("U8", (128, 5760, 90, 16))
    assert elapsed < 30, elapsed
