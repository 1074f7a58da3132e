"""The fixture checkpoints look like the real ones and transformers reads them."""

from __future__ import annotations

import json

import checkpoints as ck
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open

# ------------------------------------------------------------------------------------------------
# reference MXFP4 quantizer
# ------------------------------------------------------------------------------------------------


def test_fp4_table_matches_transformers():
    from transformers.integrations.mxfp4 import FP4_VALUES

    assert list(ck.FP4_VALUES) == list(FP4_VALUES)


def test_quantize_hand_example():
    w = torch.zeros(32)
    w[0], w[1], w[2], w[3], w[31] = 12.0, -1.0, 0.3, 5.0, -12.0
    blocks, scales = ck.quantize_mxfp4(w)  # max 12 -> scale 2^1 (12 / 2 = 6)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (1, 16) and scales.shape == (1,)
    assert scales.tolist() == [128]
    # 12/2 = 6 -> code 7; -1/2 = -.5 -> code 9 (low nibble = even element, high = odd)
    assert blocks[0, 0].item() == 7 | (9 << 4)
    # .3/2 = .15 -> 0 (code 0); 5/2 = 2.5 -> tie between 2 and 3: the smaller, code 4
    assert blocks[0, 1].item() == 0 | (4 << 4)
    assert blocks[0, 15].item() == 0 | (15 << 4)  # -6 -> code 15
    assert ck.dequantize_mxfp4(blocks, scales)[[0, 1, 2, 3, 31]].tolist() == [12.0, -1.0, 0.0, 4.0, -12.0]


def test_quantize_zero_and_tiny_blocks():
    blocks, scales = ck.quantize_mxfp4(torch.zeros(2, 64))
    assert scales.tolist() == [[127, 127], [127, 127]] and not blocks.any()
    blocks, scales = ck.quantize_mxfp4(torch.full((32,), 2.0**-140))  # below the smallest scale: zeros
    assert scales.tolist() == [0] and ck.dequantize_mxfp4(blocks, scales).abs().max() <= 2.0**-127


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    groups=st.integers(1, 3),
    exponent=st.integers(-20, 20),
    seed=st.integers(0, 2**16),
)
def test_quantize_properties(rows, groups, exponent, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * 32, generator=gen) * 2.0**exponent
    blocks, scales = ck.quantize_mxfp4(w)
    assert blocks.shape == (rows, groups, 16) and scales.shape == (rows, groups)
    deq = ck.dequantize_mxfp4(blocks, scales)  # [rows, N]
    wb = w.reshape(rows, groups, 32)
    scale = torch.exp2(scales.float() - 127).unsqueeze(-1)  # [rows, G, 1]
    amax = wb.abs().amax(-1, keepdim=True)
    assert (amax / scale <= 6).all()  # fits
    assert (amax / scale > 3).all()  # and is the smallest power of two that fits
    # nearest FP4 value: error at most half the widest gap (2, between 4 and 6) times the scale
    err = (deq.reshape(rows, groups, 32) - wb).abs()
    assert (err <= scale).all()
    # requantizing the dequantized values is lossless
    b2, s2 = ck.quantize_mxfp4(deq)
    assert torch.equal(ck.dequantize_mxfp4(b2, s2), deq)


def test_dequantize_matches_transformers_with_transpose():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 64, generator=gen)  # [E, rows, in]
    blocks, scales = ck.quantize_mxfp4(w)  # [E, rows, in/32, 16]
    theirs = _convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, rows]
    assert theirs.shape == (3, 64, 8)
    assert torch.equal(theirs, ck.dequantize_mxfp4(blocks, scales).transpose(1, 2))


# ------------------------------------------------------------------------------------------------
# per-expert checkpoints
# ------------------------------------------------------------------------------------------------


def test_per_expert_keys(per_expert_dir):
    config = json.loads((per_expert_dir / "config.json").read_text())
    model_type = config["model_type"]
    sd = ck.read_checkpoint(per_expert_dir)
    h = config["hidden_size"]
    i = config["moe_intermediate_size"] if model_type == "qwen3_moe" else config["intermediate_size"]
    for layer in range(2):
        assert sd[ck.router_key(model_type, layer)].shape == (4, h)
        for e in range(4):
            assert sd[ck.expert_key(model_type, layer, e, "gate")].shape == (i, h)
            assert sd[ck.expert_key(model_type, layer, e, "up")].shape == (i, h)
            assert sd[ck.expert_key(model_type, layer, e, "down")].shape == (h, i)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert not any("gate_up_proj" in k or k.endswith("experts.down_proj") for k in sd), "fused keys leaked"
    expert_keys = [k for k in sd if ".experts." in k]
    assert len(expert_keys) == 2 * 4 * 3
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd
    with safe_open(str(per_expert_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_per_expert_key_names_are_the_hub_ones(mixtral_dir, qwen3_moe_dir, olmoe_dir):
    mixtral = ck.read_checkpoint(mixtral_dir)
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in mixtral
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in mixtral
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in mixtral
    assert "model.layers.1.block_sparse_moe.gate.weight" in mixtral
    for d in (qwen3_moe_dir, olmoe_dir):
        sd = ck.read_checkpoint(d)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.3.{proj}.weight" in sd
        assert "model.layers.1.mlp.gate.weight" in sd


def test_per_expert_weights_are_not_degenerate(per_expert_dir):
    config = json.loads((per_expert_dir / "config.json").read_text())
    model_type = config["model_type"]
    sd = ck.read_checkpoint(per_expert_dir)
    for role in ("gate", "up", "down"):
        ws = [sd[ck.expert_key(model_type, 0, e, role)] for e in range(4)]
        assert all(not torch.equal(a, b) for n, a in enumerate(ws) for b in ws[n + 1 :])
    norms = [t for k, t in sd.items() if k.endswith("norm.weight")]
    assert norms and all(t.float().std() > 0 for t in norms)


def test_per_expert_reload_is_clean_and_exact(per_expert_dir):
    model_type = json.loads((per_expert_dir / "config.json").read_text())["model_type"]
    model, info = ck.load_model(per_expert_dir)
    ck.assert_clean_load(info)
    expected = ck.model_logits(ck.make_per_expert_model(model_type))
    got = ck.model_logits(model)
    assert torch.equal(got, expected)
    # the experts matter: swapping two experts of layer 0 changes the logits
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[[0, 1]] = experts.gate_up_proj[[1, 0]].clone()
        experts.down_proj[[0, 1]] = experts.down_proj[[1, 0]].clone()
    assert not torch.allclose(ck.model_logits(model), expected)


def test_per_expert_build_is_deterministic(tmp_path, qwen3_moe_dir):
    again = ck.build_per_expert("qwen3_moe", tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (qwen3_moe_dir / "model.safetensors").read_bytes()
    other = ck.build_per_expert("qwen3_moe", tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (qwen3_moe_dir / "model.safetensors").read_bytes()


def test_per_expert_other_dtype(tmp_path):
    out = ck.build_per_expert("olmoe", tmp_path / "f32", dtype=torch.float32, layers=1, experts=8)
    sd = ck.read_checkpoint(out)
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert ck.expert_key("olmoe", 0, 7, "down") in sd and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    model, info = ck.load_model(out)
    ck.assert_clean_load(info)
    assert torch.equal(
        ck.model_logits(model), ck.model_logits(ck.make_per_expert_model("olmoe", layers=1, experts=8, dtype=torch.float32))
    )


def test_sharded_per_expert(sharded_mixtral_dir, mixtral_dir):
    index = json.loads((sharded_mixtral_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded_mixtral_dir / "model.safetensors").exists()
    sd, single = ck.read_checkpoint(sharded_mixtral_dir), ck.read_checkpoint(mixtral_dir)
    assert set(sd) == set(index["weight_map"]) == set(single)
    assert all(torch.equal(sd[k], single[k]) for k in sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    ck.assert_clean_load(ck.loading_info(sharded_mixtral_dir))


# ------------------------------------------------------------------------------------------------
# gpt-oss MXFP4 (built with transformers, and the committed transformers-free example)
# ------------------------------------------------------------------------------------------------

GPT_OSS_EXPERT_LAYOUT = {  # suffix -> (dtype, shape after E) for H=I=64
    "gate_up_proj_blocks": ("U8", [128, 2, 16]),
    "gate_up_proj_scales": ("U8", [128, 2]),
    "gate_up_proj_bias": ("BF16", [128]),
    "down_proj_blocks": ("U8", [64, 2, 16]),
    "down_proj_scales": ("U8", [64, 2]),
    "down_proj_bias": ("BF16", [64]),
}


@pytest.fixture(params=["built", "example"])
def gpt_oss_dir(request):
    name = "gpt_oss_mxfp4_dir" if request.param == "built" else "tiny_gpt_oss_example_dir"
    return request.getfixturevalue(name)


def test_gpt_oss_hub_layout(gpt_oss_dir):
    index = json.loads((gpt_oss_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    headers = {}
    for file in ck.checkpoint_files(gpt_oss_dir):
        header = ck.read_header(file)
        assert header.pop("__metadata__") == {"format": "pt"}
        assert all(index["weight_map"][k] == file.name for k in header)
        headers.update(header)
    assert set(headers) == set(index["weight_map"])
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in headers.values())
    assert index["metadata"]["total_size"] == total
    experts = json.loads((gpt_oss_dir / "config.json").read_text())["num_local_experts"]
    for layer in range(2):
        for suffix, (dtype, shape) in GPT_OSS_EXPERT_LAYOUT.items():
            entry = headers[f"model.layers.{layer}.mlp.experts.{suffix}"]
            assert (entry["dtype"], entry["shape"]) == (dtype, [experts, *shape]), suffix
    others = {k: v for k, v in headers.items() if ".experts." not in k}
    assert all(v["dtype"] == "BF16" for v in others.values())
    for k in (
        "model.layers.0.self_attn.sinks",
        "model.layers.0.mlp.router.weight",
        "model.layers.0.mlp.router.bias",
        "model.layers.0.self_attn.q_proj.bias",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
    ):
        assert k in others
    config = json.loads((gpt_oss_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
    assert config["quantization_config"] == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }


def test_gpt_oss_ignored_copies_fail_loudly(gpt_oss_dir):
    assert (gpt_oss_dir / "metal").is_dir() and any((gpt_oss_dir / "metal").iterdir())
    with pytest.raises(SafetensorError):
        safe_open(str(gpt_oss_dir / "original" / "model.safetensors"), "pt")


def test_gpt_oss_scales_vary(gpt_oss_dir):
    sd = ck.read_checkpoint(gpt_oss_dir)
    scales = sd["model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert len(scales.unique()) >= 4
    assert sd["model.layers.0.mlp.experts.gate_up_proj_bias"].float().std() > 0


def test_gpt_oss_transformers_load_dequantized(gpt_oss_dir):
    """Mxfp4Config(dequantize=True) on CPU: clean report, experts == _convert_moe_packed_tensors."""
    from transformers import Mxfp4Config

    model, info = ck.load_model(gpt_oss_dir, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16)
    ck.assert_clean_load(info)
    assert type(model).__name__ == "GptOssForCausalLM"
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"  # not the Mxfp4 (triton) module
    ref = ck.dequantized_reference(gpt_oss_dir)
    sd = model.state_dict()
    assert set(sd) == set(ref)
    for k, t in ref.items():
        assert sd[k].dtype == torch.bfloat16
        assert torch.equal(sd[k], t), k
    e, h, i = model.config.num_local_experts, 64, 64
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (e, h, 2 * i)
    assert sd["model.layers.0.mlp.experts.down_proj"].shape == (e, i, h)


def test_gpt_oss_orientation(gpt_oss_dir):
    """Hub row r of gate_up_proj_blocks is output feature r: column r of transformers' [E, H, 2I]."""
    sd = ck.read_checkpoint(gpt_oss_dir)
    ref = ck.dequantized_reference(gpt_oss_dir, dtype=torch.float32)
    p = "model.layers.1.mlp.experts."
    rows = ck.dequantize_mxfp4(sd[p + "gate_up_proj_blocks"], sd[p + "gate_up_proj_scales"])  # [E, 2I, H]
    assert torch.equal(ref[p + "gate_up_proj"][2, :, 5], rows[2, 5, :])
    rows = ck.dequantize_mxfp4(sd[p + "down_proj_blocks"], sd[p + "down_proj_scales"])  # [E, H, I]
    assert torch.equal(ref[p + "down_proj"][3, :, 7], rows[3, 7, :])


def test_gpt_oss_built_logits_match_in_memory_model(gpt_oss_mxfp4_dir):
    model, _ = ck.make_gpt_oss_model()
    expected = ck.model_logits(model)
    got = ck.logits(gpt_oss_mxfp4_dir)  # float32, Mxfp4Config(dequantize=True) added automatically
    assert torch.equal(got, expected)
    assert got.std() > 0.1 and not torch.allclose(got[0, 0], got[0, 1])


def test_gpt_oss_example_logits_are_stable(tiny_gpt_oss_example_dir):
    got = ck.logits(tiny_gpt_oss_example_dir)
    assert got.shape == (1, 12, 128) and torch.isfinite(got).all() and got.std() > 0.1


def test_example_script_is_deterministic(tmp_path, tiny_gpt_oss_example_dir):
    out = ck.make_tiny_gpt_oss(tmp_path / "tiny")
    committed = sorted(p.relative_to(tiny_gpt_oss_example_dir) for p in tiny_gpt_oss_example_dir.rglob("*") if p.is_file())
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert written == committed
    for rel in written:
        assert (out / rel).read_bytes() == (tiny_gpt_oss_example_dir / rel).read_bytes(), rel


def test_example_size_is_small(tiny_gpt_oss_example_dir):
    assert sum(p.stat().st_size for p in tiny_gpt_oss_example_dir.rglob("*") if p.is_file()) < 300_000


def test_gpt_oss_build_is_deterministic(tmp_path, gpt_oss_mxfp4_dir):
    again = ck.build_gpt_oss_mxfp4(tmp_path / "again")
    for file in ck.checkpoint_files(gpt_oss_mxfp4_dir):
        assert (again / file.name).read_bytes() == file.read_bytes()


def test_mxfp4_dequantize_load_needs_no_accelerate_kernels_or_triton(tiny_gpt_oss_example_dir, monkeypatch):
    """What loading MXFP4 on CPU needs (transformers 5.24): with Mxfp4Config(dequantize=True) nothing
    beyond torch; without it, the quantizer insists on accelerate before anything else."""
    import transformers.quantizers.quantizer_mxfp4 as q
    from transformers import Mxfp4Config

    for name in ("is_accelerate_available", "is_kernels_available", "is_triton_available"):
        monkeypatch.setattr(q, name, lambda *a, **k: False)
    info = ck.loading_info(tiny_gpt_oss_example_dir, quantization_config=Mxfp4Config(dequantize=True))
    ck.assert_clean_load(info)
    with pytest.raises(ImportError, match="accelerate"):
        ck.loading_info(tiny_gpt_oss_example_dir, quantization_config=Mxfp4Config())
