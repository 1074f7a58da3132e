"""Tiny FP8 block checkpoints, quantized here the way DeepSeek's and Qwen's releases are: every
Linear weight (not the embeddings, the head or the router) as float8_e4m3fn with one scale per
[B0, B1] block (amax / 448, edge blocks over the elements that exist), in `weight_scale_inv`.

Scale formats: F32 (DeepSeek-V3), BF16 (Qwen3-FP8), F16, UE8M0 powers of two stored as U8 bytes
or as F32 values (DeepSeek-V3.1)."""

import json
from pathlib import Path

import torch
from checkpoints import make_per_expert_model, seeded_model
from safetensors.torch import save_file

E4M3_MAX = 448.0
SCALE_FORMATS = ("F32", "BF16", "F16", "UE8M0-U8", "UE8M0-F32")

# DeepSeek-V3 in miniature: a dense first layer, shared + routed experts, MLA projections (q_a/q_b,
# kv_a_proj_with_mqa [kv_lora_rank + rope, H], kv_b). `aligned`: every dim a multiple of 8 (transformers'
# own FP8 dequantizer refuses blocks that do not divide the weight); otherwise 20/28/36 rows and
# 24-wide experts, which blocks of 16 or 32 do not divide and 32 exceeds.
_DEEPSEEK = dict(
    vocab_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    qk_rope_head_dim=8,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_DEEPSEEK_DIMS = {
    True: dict(
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=24,
        kv_lora_rank=24,
        q_lora_rank=32,
        qk_nope_head_dim=16,
        v_head_dim=16,
    ),
    False: dict(
        hidden_size=40,
        intermediate_size=72,
        moe_intermediate_size=24,
        kv_lora_rank=20,
        q_lora_rank=36,
        qk_nope_head_dim=12,
        v_head_dim=12,
    ),
}


def make_deepseek_v3_model(*, aligned: bool, seed: int = 0):
    """A seeded tiny DeepseekV3ForCausalLM in float32 with every parameter rounded to bf16."""
    from transformers import AutoConfig

    return seeded_model(AutoConfig.for_model("deepseek_v3", **_DEEPSEEK, **_DEEPSEEK_DIMS[aligned]), seed=seed)


def quantizes(key: str, tensor: torch.Tensor) -> bool:
    """Which weights the releases store in FP8: 2-D Linear weights but the embeddings, head and router."""
    return tensor.ndim == 2 and key.endswith(".weight") and not any(s in key for s in ("embed_tokens", "lm_head", "mlp.gate."))


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int], scale_format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn [out, in], scales [ceil(out/B0), ceil(in/B1)] in scale_format)."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float()
    amax = padded.view(grid[0], block[0], grid[1], block[1]).abs().amax(dim=(1, 3)).clamp(min=1e-8)  # [G0, G1]
    if scale_format.startswith("UE8M0"):
        exponent = torch.ceil(torch.log2(amax / E4M3_MAX))  # the smallest power of two that fits
        scale = torch.exp2(exponent)
        stored = (exponent + 127).to(torch.uint8) if scale_format == "UE8M0-U8" else scale
    else:
        stored = (amax / E4M3_MAX).to({"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[scale_format])
        scale = stored.float()
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]  # [out, in]
    return (weight.float() / full).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), stored


def write_fp8(model, out_dir: Path, *, block: tuple[int, int], scale_format: str = "F32", shard: dict | None = None) -> Path:
    """Save `model` per expert (transformers' own save_pretrained), then rewrite its shard with FP8
    block weights + weight_scale_inv and config.json with the fp8 quantization_config."""
    out_dir = Path(out_dir)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    from safetensors.torch import load_file

    tensors = load_file(out_dir / "model.safetensors")
    quantized = {}
    for key, tensor in tensors.items():
        if quantizes(key, tensor):
            weight, scale = quantize_fp8_block(tensor, block, scale_format)
            quantized[key], quantized[key.removesuffix("weight") + "weight_scale_inv"] = weight, scale
        else:
            quantized[key] = tensor
    quantized.update(shard or {})
    save_file(quantized, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    if scale_format.startswith("UE8M0"):
        config["quantization_config"]["scale_fmt"] = "ue8m0"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def build_deepseek_v3_fp8(out_dir: Path, *, block: tuple[int, int], aligned: bool, scale_format: str = "F32") -> Path:
    return write_fp8(make_deepseek_v3_model(aligned=aligned), out_dir, block=block, scale_format=scale_format)


def build_qwen3_moe_fp8(out_dir: Path, *, block: tuple[int, int], scale_format: str = "BF16") -> Path:
    return write_fp8(make_per_expert_model("qwen3_moe"), out_dir, block=block, scale_format=scale_format)


def dequantize_formula(weight: torch.Tensor, stored: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The format's definition, written out independently of moeconv: fp32(w) * fp32(scale of its
    block), edge blocks cropped, rounded once to dtype (UE8M0 bytes: 2**(byte - 127))."""
    scale = torch.exp2(stored.float() - 127) if stored.dtype == torch.uint8 else stored.float()
    rows, cols = weight.shape
    full = scale.repeat_interleave(min(block[0], rows), 0).repeat_interleave(min(block[1], cols), 1)[:rows, :cols]
    return (weight.float() * full).to(dtype)
