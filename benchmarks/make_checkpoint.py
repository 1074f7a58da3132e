#!/usr/bin/env python
"""Real-geometry synthetic MoE checkpoints for benchmarks, written by streaming (never a whole tensor in RAM).

    python benchmarks/make_checkpoint.py gpt-oss-20b  OUT [--layers 2] [--vocab 201088]
    python benchmarks/make_checkpoint.py gpt-oss-120b OUT [--layers 1] [--vocab 8192]
    python benchmarks/make_checkpoint.py mixtral-8x7b OUT [--layers 1] [--vocab 32000]

gpt-oss: the hub MXFP4 layout and config.json of examples/make_tiny_gpt_oss.py (imported from there,
one copy of the key list and config), at the real widths: E=32 (20b) or E=128 (120b), H=I=2880.
Blocks are random bytes (every FP4 code occurs), scales are random in 115..130 (values finite, of
realistic magnitude), everything else random bf16. Mixtral-8x7B: the per-expert layout transformers
v5 saves (block_sparse_moe.experts.N.w1/w2/w3), H=4096, I=14336, E=8, for the fuse-experts path.

Layers and vocabulary are options so the data fits the disk: one gpt-oss-20b-width layer is ~0.4 GB of
MXFP4 input and 1.6 GB of bf16 output; a 120b-width layer 1.6 GB -> 6.4 GB; a Mixtral layer 2.8 GB.
Bytes come from a fixed pool of random data sliced at varying offsets (generation runs at disk speed);
files are written with moeconv.writer (header first, chunks streamed, fsync, rename).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moeconv import dtypes  # noqa: E402
from moeconv.format import TensorSpec, plan_shards  # noqa: E402
from moeconv.writer import ShardWriter, write_index  # noqa: E402


def _example():
    spec = importlib.util.spec_from_file_location("make_tiny_gpt_oss", REPO / "examples" / "make_tiny_gpt_oss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ex = _example()

GPT_OSS = {  # as in openai/gpt-oss-20b and -120b config.json (vocab and layers overridable)
    "gpt-oss-20b": dict(
        layers=24,
        experts=32,
        hidden=2880,
        intermediate=2880,
        vocab=201088,
        heads=64,
        kv_heads=8,
        head_dim=64,
        top_k=4,
        sliding_window=128,
    ),
    "gpt-oss-120b": dict(
        layers=36,
        experts=128,
        hidden=2880,
        intermediate=2880,
        vocab=201088,
        heads=64,
        kv_heads=8,
        head_dim=64,
        top_k=4,
        sliding_window=128,
    ),
}
MIXTRAL = dict(layers=32, experts=8, hidden=4096, intermediate=14336, vocab=32000, heads=32, kv_heads=8, top_k=2)
CHUNK = 64 * 2**20
POOL = 80 * 2**20


class Pool:
    """Random bytes, bf16 weights and E8M0 scales, served as chunks sliced from fixed pools."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.raw = torch.randint(0, 256, (POOL,), dtype=torch.uint8, generator=gen)
        self.scales = torch.randint(115, 131, (POOL,), dtype=torch.uint8, generator=gen)
        self.weights = (torch.randn(POOL // 2, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8)
        self.norms = (1 + torch.randn(POOL // 2, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8)
        self.turn = 0

    def chunk(self, kind: str, nbytes: int) -> torch.Tensor:
        pool = getattr(self, kind)
        self.turn = (self.turn * 7919 + 104729) % (POOL - CHUNK)
        start = self.turn & ~1  # keep bf16 elements whole
        return pool[start : start + nbytes]


def _kind(key: str, dtype: str) -> str:
    if key.endswith("_scales"):
        return "scales"
    if key.endswith("_blocks"):
        return "raw"
    if "norm" in key:
        return "norms"
    return "weights"


def write_checkpoint(out: Path, specs: list[TensorSpec], *, max_shard_size: int = 5 * 10**9, seed: int = 0) -> int:
    """Stream every tensor of `specs` into shards (+ index) in `out`; returns total tensor bytes."""
    pool = Pool(seed)
    layouts = plan_shards(specs, max_shard_size)
    for layout in layouts:
        with ShardWriter(out, layout) as writer:
            for spec in layout.order:
                kind = _kind(spec.key, spec.dtype)
                left = spec.nbytes
                while left:
                    n = min(left, CHUNK)
                    writer.write(spec.key, pool.chunk(kind, n).numpy())  # raw bytes
                    left -= n
            writer.finish()
    write_index(out, layouts)
    return sum(s.nbytes for s in specs)


def gpt_oss(out: Path, width: str, layers: int, vocab: int) -> int:
    dims = {**GPT_OSS[width], "layers": layers, "vocab": vocab}
    layout = ex.hub_layout(**dims)
    specs = [TensorSpec(key, dtypes.to_safetensors(dtype), shape) for key, (dtype, shape) in layout.items()]
    total = write_checkpoint(out, specs)
    ex.write_json(out / "config.json", ex.hub_config(**dims))
    ex.write_json(out / "generation_config.json", ex.GENERATION_CONFIG)
    return total


def mixtral_config(d: dict) -> dict:
    """config.json as mistralai/Mixtral-8x7B-v0.1 has it (layers and vocab from `d`)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": d["intermediate"],
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": d["heads"],
        "num_experts_per_tok": d["top_k"],
        "num_hidden_layers": d["layers"],
        "num_key_value_heads": d["kv_heads"],
        "num_local_experts": d["experts"],
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": d["vocab"],
    }


def mixtral(out: Path, layers: int, vocab: int) -> int:
    d = {**MIXTRAL, "layers": layers, "vocab": vocab}
    h, i, e, q, kv = d["hidden"], d["intermediate"], d["experts"], d["heads"] * 128, d["kv_heads"] * 128
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "block_sparse_moe.gate.weight": (e, h),
            }
        )
        for m in range(e):
            x = f"{p}block_sparse_moe.experts.{m}."
            shapes.update({x + "w1.weight": (i, h), x + "w3.weight": (i, h), x + "w2.weight": (h, i)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    total = write_checkpoint(out, [TensorSpec(k, "BF16", s) for k, s in shapes.items()])
    (out / "config.json").write_text(json.dumps(mixtral_config(d), indent=2) + "\n")
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=[*GPT_OSS, "mixtral-8x7b"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=None, help="default: the real model's")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    if args.model == "mixtral-8x7b":
        total = mixtral(args.out, args.layers, args.vocab or MIXTRAL["vocab"])
    else:
        total = gpt_oss(args.out, args.model, args.layers, args.vocab or GPT_OSS[args.model]["vocab"])
    print(f"wrote {args.out}: {args.model} width, {args.layers} layer(s), {total / 1e9:.2f} GB of tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
