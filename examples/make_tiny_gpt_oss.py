#!/usr/bin/env python
"""Write a tiny, deterministic gpt-oss MXFP4 checkpoint in the hub layout, without transformers.

    python examples/make_tiny_gpt_oss.py OUT_DIR

Only torch, safetensors and json are needed. Running it twice gives byte-identical files.

What OUT_DIR gets (mirrors openai/gpt-oss-20b on the hub, scaled down):

    config.json                         model_type gpt_oss + quantization_config (mxfp4), hub-style
                                        (rope_scaling / rope_theta, as the hub file has them)
    generation_config.json
    model-00001-of-00002.safetensors    two shards of about equal bytes, cut in key order
    model-00002-of-00002.safetensors
    model.safetensors.index.json        metadata.total_size + weight_map
    original/model.safetensors          GARBAGE on purpose: tools must never read original/
    original/config.json                dummy
    metal/model.bin                     dummy: tools must never read metal/

Per layer L, `model.layers.L.mlp.experts.`:
    gate_up_proj_blocks U8 [E, 2I, H/32, 16]   rows interleaved: even row = gate, odd row = up
    gate_up_proj_scales U8 [E, 2I, H/32]       E8M0, value * 2^(s - 127)
    gate_up_proj_bias  BF16 [E, 2I]
    down_proj_blocks    U8 [E, H, I/32, 16]
    down_proj_scales    U8 [E, H, I/32]
    down_proj_bias     BF16 [E, H]
Everything else is bf16 under transformers' names (self_attn.{q,k,v,o}_proj.{weight,bias},
self_attn.sinks, mlp.router.{weight,bias}, input/post_attention_layernorm, model.norm,
model.embed_tokens, lm_head).

This module is also the single home of the reference MXFP4 quantizer used by the tests
(tests/checkpoints.py imports it from here): `quantize_mxfp4`, `dequantize_mxfp4`, and the
small sharded writer `save_sharded`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# FP4 E2M1 code -> value. Low nibble = even element, high nibble = odd element.
FP4_VALUES = (+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAGNITUDES = torch.tensor(FP4_VALUES[:8], dtype=torch.float32)  # codes 0..7
MXFP4_BLOCK = 32  # elements per scale
FP4_MAX = 6.0

# As in openai/gpt-oss-20b and -120b config.json.
MXFP4_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}

# The ignore-me copies real gpt-oss repos carry. Starts with a header length of 2^64-1, so any
# safetensors parser fails at once ("header too large") instead of silently reading it.
GARBAGE_SAFETENSORS = b"\xff" * 8 + b"moeconv test fixture: original/ must never be read\n"


# --------------------------------------------------------------------------------------------
# Reference MXFP4 quantizer (slow, obvious, exact)
# --------------------------------------------------------------------------------------------
def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last axis: w [..., N] -> (blocks U8 [..., N/32, 16], scales U8 [..., N/32]).

    Per block of 32 elements: the E8M0 scale s is the smallest power of two 2^(s-127) with
    max|w| / 2^(s-127) <= 6 (clamped to s in [0, 254]; an all-zero block gets s = 127). Each element
    is rounded to the nearest FP4 E2M1 value (ties go to the smaller magnitude; anything beyond 6
    saturates to +-6; a value rounding to zero is stored as +0). Packing: low nibble = even element,
    high nibble = odd element.
    """
    *prefix, n = w.shape
    if n % MXFP4_BLOCK:
        raise ValueError(f"last axis {n} is not a multiple of {MXFP4_BLOCK}")
    x = w.detach().to(torch.float32).reshape(*prefix, n // MXFP4_BLOCK, MXFP4_BLOCK)  # [..., G, 32]
    amax = x.abs().amax(dim=-1)  # [..., G]

    # smallest e with amax / 2^e <= 6; log2 only gives the first guess, the loop makes it exact
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    e = torch.ceil(torch.log2(safe / FP4_MAX)).to(torch.int32)
    e = torch.where(safe / torch.exp2(e.float()) > FP4_MAX, e + 1, e)
    e = torch.where(safe / torch.exp2((e - 1).float()) <= FP4_MAX, e - 1, e)
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    s = (e + 127).clamp(0, 254)  # [..., G]

    scaled = x / torch.exp2((s - 127).float()).unsqueeze(-1)  # [..., G, 32], |.| <= 6 unless clamped
    mag = scaled.abs().clamp(max=FP4_MAX)
    code = (mag.unsqueeze(-1) - FP4_MAGNITUDES).abs().argmin(dim=-1)  # [..., G, 32], first = smaller
    code = torch.where((scaled < 0) & (code > 0), code + 8, code).to(torch.uint8)

    pairs = code.reshape(*prefix, n // MXFP4_BLOCK, MXFP4_BLOCK // 2, 2)  # [..., G, 16, 2]
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)  # [..., G, 16]
    return blocks.contiguous(), s.to(torch.uint8).contiguous()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse layout of `quantize_mxfp4`: (blocks [..., G, 16], scales [..., G]) -> [..., G*32].

    No transpose (transformers' `_convert_moe_packed_tensors` returns this with axes 1 and 2 swapped).
    """
    *prefix, g, b = blocks.shape
    if tuple(scales.shape) != (*prefix, g):
        raise ValueError(f"blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    blocks = blocks.to(torch.uint8)
    vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., G, 16, 2]
    vals = vals.reshape(*prefix, g, 2 * b)  # [..., G, 32]
    out = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)  # [..., G, 32]
    return out.reshape(*prefix, g * 2 * b).to(dtype)  # [..., N]


# --------------------------------------------------------------------------------------------
# Small sharded writer (whole tensors in memory: fine for fixtures)
# --------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> dict:
    """Write `tensors` (in the given key order) to `shards` files named model-0000i-of-0000n.safetensors,
    cut at the key order so each file gets about the same number of bytes, plus
    model.safetensors.index.json. With shards == 1, writes a single model.safetensors and no index.
    Returns the index dict ({} for a single file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    if shards < 1 or shards > len(keys):
        raise ValueError(f"shards must be in [1, {len(keys)}], got {shards}")
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return {}
    total = sum(_nbytes(tensors[k]) for k in keys)
    groups: list[list[str]] = [[] for _ in range(shards)]
    start = 0
    for k in keys:  # shard = which n-th of the byte range the tensor starts in: monotone in key order
        groups[min(shards - 1, start * shards // total)].append(k)
        start += _nbytes(tensors[k])
    groups = [g for g in groups if g]
    if len(groups) != shards:  # pathological byte distributions: fall back to equal key counts
        groups = [keys[j * len(keys) // shards : (j + 1) * len(keys) // shards] for j in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in group}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / "model.safetensors.index.json", index)
    return index


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_ignored_copies(out_dir: Path) -> None:
    """original/ and metal/ as real gpt-oss repos have them; contents are junk that fails loudly."""
    out_dir = Path(out_dir)
    (out_dir / "original").mkdir(parents=True, exist_ok=True)
    (out_dir / "metal").mkdir(parents=True, exist_ok=True)
    (out_dir / "original" / "model.safetensors").write_bytes(GARBAGE_SAFETENSORS)
    (out_dir / "original" / "config.json").write_text('{"moeconv_fixture": "original/ must never be read"}\n')
    (out_dir / "metal" / "model.bin").write_bytes(b"moeconv test fixture: metal/ must never be read\n")


# --------------------------------------------------------------------------------------------
# The tiny model itself
# --------------------------------------------------------------------------------------------
# 8 experts and 8 heads: the router bias [E] and the attention sinks [heads] are bf16, so these make
# them 16 bytes, and every tensor of a converted output can start 16-byte aligned (no warning).
TINY = dict(
    layers=2, experts=8, hidden=64, intermediate=64, vocab=128, heads=8, kv_heads=2, head_dim=8, top_k=2, sliding_window=8
)


def hub_config(*, layers, experts, hidden, intermediate, vocab, heads, kv_heads, head_dim, top_k, sliding_window) -> dict:
    """config.json as the gpt-oss hub repos write it (transformers 4.55 era field names)."""
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
        "sliding_window": sliding_window,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": vocab,
    }


GENERATION_CONFIG = {
    "bos_token_id": 1,
    "do_sample": True,
    "eos_token_id": [2, 0],
    "pad_token_id": 0,
    "transformers_version": "4.55.0.dev0",
}


def expert_weight(gen: torch.Generator, shape: tuple[int, ...], std: float = 0.2) -> torch.Tensor:
    """Random weight whose 32-element blocks along the last axis have different magnitudes, so the
    MXFP4 scales are not all equal."""
    *prefix, n = shape
    w = torch.randn(*prefix, n // MXFP4_BLOCK, MXFP4_BLOCK, generator=gen) * std  # [..., G, 32]
    w = w * torch.exp2(torch.randint(-3, 3, (*prefix, n // MXFP4_BLOCK, 1), generator=gen).float())
    return w.reshape(shape)


def hub_layout(
    *, layers, experts, hidden, intermediate, vocab, heads, kv_heads, head_dim, **_
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """key -> (dtype, shape) of every hub-layout tensor, in write order, for any width (the tiny
    example, or gpt-oss-20b / -120b geometry for benchmarks/make_checkpoint.py)."""
    e, h, i, q, kv = experts, hidden, intermediate, heads * head_dim, kv_heads * head_dim
    bf16, u8 = torch.bfloat16, torch.uint8
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"model.embed_tokens.weight": (bf16, (vocab, h))}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        x = p + "mlp.experts."
        layout.update(
            {
                p + "input_layernorm.weight": (bf16, (h,)),
                p + "self_attn.q_proj.weight": (bf16, (q, h)),
                p + "self_attn.q_proj.bias": (bf16, (q,)),
                p + "self_attn.k_proj.weight": (bf16, (kv, h)),
                p + "self_attn.k_proj.bias": (bf16, (kv,)),
                p + "self_attn.v_proj.weight": (bf16, (kv, h)),
                p + "self_attn.v_proj.bias": (bf16, (kv,)),
                p + "self_attn.o_proj.weight": (bf16, (h, q)),
                p + "self_attn.o_proj.bias": (bf16, (h,)),
                p + "self_attn.sinks": (bf16, (heads,)),
                p + "post_attention_layernorm.weight": (bf16, (h,)),
                p + "mlp.router.weight": (bf16, (e, h)),
                p + "mlp.router.bias": (bf16, (e,)),
                x + "gate_up_proj_blocks": (u8, (e, 2 * i, h // MXFP4_BLOCK, 16)),  # [E, 2I, H/32, 16]
                x + "gate_up_proj_scales": (u8, (e, 2 * i, h // MXFP4_BLOCK)),  # [E, 2I, H/32]
                x + "gate_up_proj_bias": (bf16, (e, 2 * i)),  # [E, 2I]
                x + "down_proj_blocks": (u8, (e, h, i // MXFP4_BLOCK, 16)),  # [E, H, I/32, 16]
                x + "down_proj_scales": (u8, (e, h, i // MXFP4_BLOCK)),  # [E, H, I/32]
                x + "down_proj_bias": (bf16, (e, h)),  # [E, H]
            }
        )
    layout["model.norm.weight"] = (bf16, (h,))
    layout["lm_head.weight"] = (bf16, (vocab, h))
    return layout


def tiny_state_dict(
    seed: int = 0, *, layers, experts, hidden, intermediate, vocab, heads, kv_heads, head_dim, **_
) -> dict[str, torch.Tensor]:
    """Hub-layout tensors, keys in the order they are written."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1, mean=0.0):
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16)

    e, h, i = experts, hidden, intermediate
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, h, std=1.0)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        sd[p + "input_layernorm.weight"] = rnd(h, mean=1.0)
        sd[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, h)
        sd[p + "self_attn.q_proj.bias"] = rnd(heads * head_dim)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, h)
        sd[p + "self_attn.k_proj.bias"] = rnd(kv_heads * head_dim)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, h)
        sd[p + "self_attn.v_proj.bias"] = rnd(kv_heads * head_dim)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, heads * head_dim)
        sd[p + "self_attn.o_proj.bias"] = rnd(h)
        sd[p + "self_attn.sinks"] = rnd(heads, std=0.5)
        sd[p + "post_attention_layernorm.weight"] = rnd(h, mean=1.0)
        sd[p + "mlp.router.weight"] = rnd(e, h, std=0.5)
        sd[p + "mlp.router.bias"] = rnd(e)
        x = p + "mlp.experts."
        # hub orientation: rows = output features (2I interleaved gate/up, resp. H), quantized along input
        gate_up = expert_weight(gen, (e, 2 * i, h))  # [E, 2I, H]
        sd[x + "gate_up_proj_blocks"], sd[x + "gate_up_proj_scales"] = quantize_mxfp4(gate_up)
        sd[x + "gate_up_proj_bias"] = rnd(e, 2 * i)  # [E, 2I]
        down = expert_weight(gen, (e, h, i))  # [E, H, I]
        sd[x + "down_proj_blocks"], sd[x + "down_proj_scales"] = quantize_mxfp4(down)
        sd[x + "down_proj_bias"] = rnd(e, h)  # [E, H]
    sd["model.norm.weight"] = rnd(h, mean=1.0)
    sd["lm_head.weight"] = rnd(vocab, h)
    layout = hub_layout(
        layers=layers, experts=e, hidden=h, intermediate=i, vocab=vocab, heads=heads, kv_heads=kv_heads, head_dim=head_dim
    )
    assert {k: (t.dtype, tuple(t.shape)) for k, t in sd.items()} == layout  # one layout, two writers
    return sd


def make_tiny_gpt_oss(out_dir: str | Path, *, seed: int = 0, shards: int = 2, **overrides) -> Path:
    dims = {**TINY, **overrides}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_sharded(tiny_state_dict(seed, **dims), out, shards)
    write_json(out / "config.json", hub_config(**dims))
    write_json(out / "generation_config.json", GENERATION_CONFIG)
    write_ignored_copies(out)
    return out


def main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):  # never a folder named like an option
        print(f"usage:{usage.strip().removeprefix('python')}", file=sys.stderr)
        return 2
    out = make_tiny_gpt_oss(argv[0])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
