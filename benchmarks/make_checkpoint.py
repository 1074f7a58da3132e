#!/usr/bin/env python
"""Real-geometry synthetic MoE checkpoints for benchmarks, streamed to disk (never a whole tensor in RAM).

    python benchmarks/make_checkpoint.py gpt-oss-20b  OUT [--layers 2] [--vocab 201088]
    python benchmarks/make_checkpoint.py gpt-oss-120b OUT [--layers 1] [--vocab 8192]
    python benchmarks/make_checkpoint.py mixtral-8x7b OUT [--layers 1] [--vocab 32000]
    python benchmarks/make_checkpoint.py deepseek-v3  OUT [--layers 1] [--vocab 129280]
    python benchmarks/make_checkpoint.py kimi-k2-int4 OUT [--layers 1] [--vocab 163840]

Self-contained: numpy and the standard library only (no moeconv, no torch), so it keeps working
whatever moeconv's internals become.

gpt-oss: the hub MXFP4 layout and config.json of openai/gpt-oss-20b / -120b at the real widths,
E=32 (20b) or E=128 (120b), H=I=2880; per layer L, `model.layers.L.mlp.experts.`:

    gate_up_proj_blocks U8 [E, 2I, H/32, 16]   gate_up_proj_scales U8 [E, 2I, H/32]
    gate_up_proj_bias BF16 [E, 2I]
    down_proj_blocks    U8 [E, H, I/32, 16]    down_proj_scales    U8 [E, H, I/32]
    down_proj_bias    BF16 [E, H]

plus attention (q/k/v/o weights and biases, sinks), router, norms, embed_tokens and lm_head in bf16.
Blocks are random bytes (every FP4 code occurs); scales are random E8M0 exponents in 115..127, so
every value is at most 6 in magnitude and finite in fp16 as well as bf16; weights are random bf16
(std 0.02), norms around 1. Mixtral-8x7B: the per-expert layout transformers saves
(block_sparse_moe.experts.N.w1/w2/w3), H=4096, I=14336, E=8, everything bf16. DeepSeek-V3: the
hub's FP8 layout (every Linear float8_e4m3fn + an fp32 `weight_scale_inv` per 128x128 block, random
E4M3 bytes but NaN, scales in 1e-5..1e-3), H=7168, expert I=2048, 256 routed + 1 shared expert, MLA
attention, every layer a MoE layer. Kimi-K2-Thinking (kimi-k2-int4): the same architecture with 384
experts and 64 heads, its routed experts compressed-tensors pack-quantized INT4 (random words, bf16
group-32 scales, weight_shape as data), everything else bf16.

Files as the hub has them: shards of at most 5 GB of tensor bytes (--max-shard-gb), cut in key order
as transformers cuts them, model-0000i-of-0000n.safetensors plus model.safetensors.index.json (one
shard: model.safetensors, no index). Each shard: an 8-byte little-endian header length, the JSON
header (`__metadata__: {"format": "pt"}`, dtype, shape and data_offsets per tensor, data in natural
key order, padded with spaces so the data starts at a multiple of 16), then the data, written in
64 MiB chunks sliced at varying offsets from a fixed pool of random bytes (generation runs at disk
speed), fsynced. config.json is written last: its presence marks a complete checkpoint.

Sizes: one gpt-oss-20b-width layer is ~0.48 GB of MXFP4 input and ~1.6 GB of bf16 output; a
120b-width layer ~1.7 GB -> ~6.4 GB; the real vocabulary adds 2 x 1.16 GB (embed_tokens, lm_head);
a Mixtral layer 2.8 GB; a DeepSeek-V3 layer ~11.5 GB of FP8 -> ~23 GB of bf16, its vocabulary 2 x 1.85 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np

GPT_OSS = {  # as in openai/gpt-oss-20b and -120b config.json (vocab and layers overridable)
    "gpt-oss-20b": dict(
        layers=24, experts=32, hidden=2880, intermediate=2880, vocab=201088, heads=64, kv_heads=8, head_dim=64, top_k=4
    ),
    "gpt-oss-120b": dict(
        layers=36, experts=128, hidden=2880, intermediate=2880, vocab=201088, heads=64, kv_heads=8, head_dim=64, top_k=4
    ),
}
MIXTRAL = dict(layers=32, experts=8, hidden=4096, intermediate=14336, vocab=32000, heads=32, kv_heads=8, top_k=2)
DEEPSEEK_V3 = dict(  # as in deepseek-ai/DeepSeek-V3 config.json (layers and vocab overridable)
    layers=61,
    experts=256,
    hidden=7168,
    intermediate=18432,
    moe_intermediate=2048,
    vocab=129280,
    heads=128,
    q_lora=1536,
    kv_lora=512,
    rope=64,
    nope=128,
    v_head=128,
    top_k=8,
)
FP8_BLOCK = (128, 128)
KIMI_K2 = {**DEEPSEEK_V3, "experts": 384, "heads": 64, "vocab": 163840}  # moonshotai/Kimi-K2-Thinking: DeepSeek-V3's architecture
INT4_GROUP = 32
MXFP4_BLOCK = 32  # elements per E8M0 scale
SCALES = (115, 127)  # E8M0 exponents drawn from this closed range
CHUNK = 64 * 2**20
POOL = 80 * 2**20
ALIGN = 16  # the data section starts at a multiple of this
ITEMSIZE = {"BF16": 2, "U8": 1, "F8_E4M3": 1, "F32": 4, "I32": 4, "I64": 8}

MXFP4_QUANTIZATION_CONFIG = {  # as in the hub's config.json
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
GENERATION_CONFIG = {
    "bos_token_id": 1,
    "do_sample": True,
    "eos_token_id": [2, 0],
    "pad_token_id": 0,
    "transformers_version": "4.55.0.dev0",
}


# ---------------------------------------------------------------------------------------------
# Layouts and configs
# ---------------------------------------------------------------------------------------------
def gpt_oss_layout(*, layers, experts, hidden, intermediate, vocab, heads, kv_heads, head_dim, **_) -> dict:
    """key -> (dtype, shape) of every hub-layout tensor, in key order as the hub lists them."""
    e, h, i, q, kv = experts, hidden, intermediate, heads * head_dim, kv_heads * head_dim
    layout = {"model.embed_tokens.weight": ("BF16", (vocab, h))}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        x = p + "mlp.experts."
        layout.update(
            {
                p + "input_layernorm.weight": ("BF16", (h,)),
                p + "self_attn.q_proj.weight": ("BF16", (q, h)),
                p + "self_attn.q_proj.bias": ("BF16", (q,)),
                p + "self_attn.k_proj.weight": ("BF16", (kv, h)),
                p + "self_attn.k_proj.bias": ("BF16", (kv,)),
                p + "self_attn.v_proj.weight": ("BF16", (kv, h)),
                p + "self_attn.v_proj.bias": ("BF16", (kv,)),
                p + "self_attn.o_proj.weight": ("BF16", (h, q)),
                p + "self_attn.o_proj.bias": ("BF16", (h,)),
                p + "self_attn.sinks": ("BF16", (heads,)),
                p + "post_attention_layernorm.weight": ("BF16", (h,)),
                p + "mlp.router.weight": ("BF16", (e, h)),
                p + "mlp.router.bias": ("BF16", (e,)),
                x + "gate_up_proj_blocks": ("U8", (e, 2 * i, h // MXFP4_BLOCK, 16)),
                x + "gate_up_proj_scales": ("U8", (e, 2 * i, h // MXFP4_BLOCK)),
                x + "gate_up_proj_bias": ("BF16", (e, 2 * i)),
                x + "down_proj_blocks": ("U8", (e, h, i // MXFP4_BLOCK, 16)),
                x + "down_proj_scales": ("U8", (e, h, i // MXFP4_BLOCK)),
                x + "down_proj_bias": ("BF16", (e, h)),
            }
        )
    layout["model.norm.weight"] = ("BF16", (h,))
    layout["lm_head.weight"] = ("BF16", (vocab, h))
    return layout


def gpt_oss_config(*, layers, experts, hidden, intermediate, vocab, heads, kv_heads, head_dim, top_k) -> dict:
    """config.json as the gpt-oss hub repos have it (layers and vocabulary as asked)."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 2,
        "experts_per_token": top_k,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        "max_position_embeddings": 131072,
        "model_type": "gpt_oss",
        "num_attention_heads": heads,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "num_local_experts": experts,
        "output_router_logits": False,
        "pad_token_id": 0,
        "quantization_config": MXFP4_QUANTIZATION_CONFIG,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": vocab,
    }


def mixtral_layout(*, layers, experts, hidden, intermediate, vocab, heads, kv_heads, **_) -> dict:
    h, i, e, q, kv = hidden, intermediate, experts, heads * 128, kv_heads * 128
    layout = {"model.embed_tokens.weight": ("BF16", (vocab, h))}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        layout.update(
            {
                p + "input_layernorm.weight": ("BF16", (h,)),
                p + "post_attention_layernorm.weight": ("BF16", (h,)),
                p + "self_attn.q_proj.weight": ("BF16", (q, h)),
                p + "self_attn.k_proj.weight": ("BF16", (kv, h)),
                p + "self_attn.v_proj.weight": ("BF16", (kv, h)),
                p + "self_attn.o_proj.weight": ("BF16", (h, q)),
                p + "block_sparse_moe.gate.weight": ("BF16", (e, h)),
            }
        )
        for m in range(e):
            x = f"{p}block_sparse_moe.experts.{m}."
            layout.update(
                {x + "w1.weight": ("BF16", (i, h)), x + "w3.weight": ("BF16", (i, h)), x + "w2.weight": ("BF16", (h, i))}
            )
    layout["model.norm.weight"] = ("BF16", (h,))
    layout["lm_head.weight"] = ("BF16", (vocab, h))
    return layout


def mixtral_config(*, layers, experts, hidden, intermediate, vocab, heads, kv_heads, top_k) -> dict:
    """config.json as mistralai/Mixtral-8x7B-v0.1 has it (layers and vocabulary as asked)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": heads,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "num_local_experts": experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }


def _fp8_linear(layout: dict, key: str, rows: int, cols: int) -> None:
    """An FP8 block Linear as DeepSeek ships it: the weight and its fp32 scale grid."""
    layout[key + ".weight"] = ("F8_E4M3", (rows, cols))
    layout[key + ".weight_scale_inv"] = ("F32", (-(-rows // FP8_BLOCK[0]), -(-cols // FP8_BLOCK[1])))


def _int4_linear(layout: dict, key: str, rows: int, cols: int) -> None:
    """A compressed-tensors pack-quantized INT4 Linear (symmetric, group 32), as Kimi-K2-Thinking
    ships its routed experts: packed words, a bf16 scale per group, and the [out, in] shape as data."""
    layout[key + ".weight_packed"] = ("I32", (rows, cols // 8))
    layout[key + ".weight_scale"] = ("BF16", (rows, cols // INT4_GROUP))
    layout[key + ".weight_shape"] = ("I64", (2,), np.array([rows, cols], dtype="<i8").tobytes())


def _bf16_linear(layout: dict, key: str, rows: int, cols: int) -> None:
    layout[key + ".weight"] = ("BF16", (rows, cols))


def deepseek_v3_layout(
    *, layers, experts, hidden, moe_intermediate, vocab, heads, q_lora, kv_lora, rope, nope, v_head, int4_experts=False, **_
) -> dict:
    """Every layer a MoE layer (first_k_dense_replace = 0): MLA attention, routed experts and one
    shared expert, every Linear FP8 in 128x128 blocks; embeddings, head, norms, router bf16.
    `int4_experts` (Kimi-K2-Thinking): the routed experts INT4, every other Linear bf16."""
    h, i = hidden, moe_intermediate
    linear = _bf16_linear if int4_experts else _fp8_linear
    layout = {"model.embed_tokens.weight": ("BF16", (vocab, h))}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        layout[p + "input_layernorm.weight"] = ("BF16", (h,))
        linear(layout, p + "self_attn.q_a_proj", q_lora, h)
        layout[p + "self_attn.q_a_layernorm.weight"] = ("BF16", (q_lora,))
        linear(layout, p + "self_attn.q_b_proj", heads * (nope + rope), q_lora)
        linear(layout, p + "self_attn.kv_a_proj_with_mqa", kv_lora + rope, h)  # [576, 7168]: a [5, 56] FP8 grid
        layout[p + "self_attn.kv_a_layernorm.weight"] = ("BF16", (kv_lora,))
        linear(layout, p + "self_attn.kv_b_proj", heads * (nope + v_head), kv_lora)
        linear(layout, p + "self_attn.o_proj", h, heads * v_head)
        layout[p + "post_attention_layernorm.weight"] = ("BF16", (h,))
        layout[p + "mlp.gate.weight"] = ("BF16", (experts, h))
        layout[p + "mlp.gate.e_score_correction_bias"] = ("F32", (experts,))
        for m in [*range(experts), "shared"]:
            x = p + ("mlp.shared_experts." if m == "shared" else f"mlp.experts.{m}.")
            expert = _int4_linear if int4_experts and m != "shared" else linear
            expert(layout, x + "gate_proj", i, h)
            expert(layout, x + "up_proj", i, h)
            expert(layout, x + "down_proj", h, i)
    layout["model.norm.weight"] = ("BF16", (h,))
    layout["lm_head.weight"] = ("BF16", (vocab, h))
    return dict(sorted(layout.items(), key=lambda kv: _natural_key(kv[0])))


def deepseek_v3_config(
    *, layers, experts, hidden, intermediate, moe_intermediate, vocab, heads, q_lora, kv_lora, rope, nope, v_head, top_k
) -> dict:
    """config.json as deepseek-ai/DeepSeek-V3 has it, every layer MoE (layers and vocabulary as asked)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 0,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "kv_lora_rank": kv_lora,
        "max_position_embeddings": 163840,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": moe_intermediate,
        "n_group": 8,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_key_value_heads": heads,
        "q_lora_rank": q_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(FP8_BLOCK),
        },
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "tie_word_embeddings": False,
        "topk_group": 4,
        "torch_dtype": "bfloat16",
        "v_head_dim": v_head,
        "vocab_size": vocab,
    }


# ---------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------
def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (round to nearest even) as bytes."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype(np.uint16).view(np.uint8)


class Pool:
    """Random blocks, E8M0 scales, bf16 weights and norms, served as chunks sliced from fixed pools."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.raw = rng.integers(0, 256, POOL, dtype=np.uint8)
        self.scales = rng.integers(SCALES[0], SCALES[1] + 1, POOL, dtype=np.uint8)
        self.weights = _bf16(rng.standard_normal(POOL // 2, dtype=np.float32) * 0.02)
        self.norms = _bf16(1 + rng.standard_normal(POOL // 2, dtype=np.float32) * 0.02)
        fp8 = rng.integers(0, 256, POOL, dtype=np.uint8)
        self.fp8 = np.where((fp8 & 0x7F) == 0x7F, fp8 ^ 0x01, fp8).astype(np.uint8)  # every E4M3 byte but NaN
        self.fp8_scales = (rng.uniform(1e-5, 1e-3, POOL // 4).astype(np.float32)).view(np.uint8)
        self.turn = 0

    def chunk(self, kind: str, nbytes: int) -> memoryview:
        pool = getattr(self, kind)
        self.turn = (self.turn * 7919 + 104729) % (POOL - CHUNK)
        start = self.turn & ~3  # keep bf16 and fp32 elements whole
        return memoryview(pool[start : start + nbytes])


INT4_QUANTIZATION_CONFIG = {  # as in moonshotai/Kimi-K2-Thinking config.json (ignore: what this layout leaves bf16)
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": INT4_GROUP,
                "dynamic": False,
                "actorder": None,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp[.]gate$"],
    "kv_cache_scheme": None,
}


def _kind(key: str, dtype: str) -> str:
    if dtype == "F8_E4M3":
        return "fp8"
    if key.endswith("_scale_inv"):
        return "fp8_scales"
    if dtype == "F32":  # DeepSeek's e_score_correction_bias: any small fp32 values do
        return "fp8_scales"
    if key.endswith("_scales"):
        return "scales"
    if key.endswith("_blocks"):
        return "raw"
    if "norm" in key:
        return "norms"
    return "weights"


def _natural_key(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = ITEMSIZE[dtype]
    for dim in shape:
        n *= dim
    return n


def split_shards(layout: dict, max_shard_size: int) -> list[list[str]]:
    """Keys in order, cut as transformers cuts them: a new shard when the next tensor would push the
    current one over `max_shard_size` tensor bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for key, (dtype, shape, *_) in layout.items():
        n = _nbytes(dtype, shape)
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += n
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, layout: dict, keys: list[str], pool: Pool) -> int:
    """One safetensors file, header first, data streamed in chunks, fsynced; returns tensor bytes."""
    keys = sorted(keys, key=_natural_key)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    position = 0
    for key in keys:
        dtype, shape = layout[key][:2]
        n = _nbytes(dtype, shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + n]}
        position += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb", buffering=0) as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key in keys:
            if len(layout[key]) == 3:  # (dtype, shape, the bytes themselves): data a reader interprets
                f.write(layout[key][2])
                continue
            left = _nbytes(*layout[key])
            while left:
                n = min(left, CHUNK)
                f.write(pool.chunk(_kind(key, layout[key][0]), n))
                left -= n
        os.fsync(f.fileno())
    return position


def write_checkpoint(out: Path, layout: dict, max_shard_size: int, seed: int = 0) -> int:
    """Every tensor of `layout` into shards (+ the index when there are several); tensor bytes."""
    pool = Pool(seed)
    shards = split_shards(layout, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    total = sum(write_shard(out / name, layout, keys, pool) for name, keys in zip(names, shards))
    if len(shards) > 1:
        weight_map = {key: name for name, keys in zip(names, shards) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(out / "model.safetensors.index.json", index)
    return total


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=[*GPT_OSS, "mixtral-8x7b", "deepseek-v3", "kimi-k2-int4"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=None, help="default: the real model's")
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="tensor bytes per shard at most, in GB (default 5, as the hub)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    if args.model == "deepseek-v3":
        dims = {**DEEPSEEK_V3, "layers": args.layers, "vocab": args.vocab or DEEPSEEK_V3["vocab"]}
        layout, config, generation = deepseek_v3_layout(**dims), deepseek_v3_config(**dims), None
    elif args.model == "kimi-k2-int4":
        dims = {**KIMI_K2, "layers": args.layers, "vocab": args.vocab or KIMI_K2["vocab"]}
        layout, config = deepseek_v3_layout(**dims, int4_experts=True), deepseek_v3_config(**dims)
        config["quantization_config"], generation = INT4_QUANTIZATION_CONFIG, None
    elif args.model == "mixtral-8x7b":
        dims = {**MIXTRAL, "layers": args.layers, "vocab": args.vocab or MIXTRAL["vocab"]}
        layout, config, generation = mixtral_layout(**dims), mixtral_config(**dims), None
    else:
        dims = {**GPT_OSS[args.model], "layers": args.layers, "vocab": args.vocab or GPT_OSS[args.model]["vocab"]}
        layout, config, generation = gpt_oss_layout(**dims), gpt_oss_config(**dims), GENERATION_CONFIG
    total = write_checkpoint(args.out, layout, int(args.max_shard_gb * 1e9), args.seed)
    if generation:
        write_json(args.out / "generation_config.json", generation)
    write_json(args.out / "config.json", config)  # last: marks the checkpoint complete
    print(f"wrote {args.out}: {args.model} width, {args.layers} layer(s), {total / 1e9:.2f} GB of tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
