"""Tiny MoE checkpoints for tests, built locally (no hub access).

Import from tests as `from checkpoints import build_per_expert, ...` (pytest puts tests/ on sys.path
because tests/conftest.py lives there); the fixtures in tests/conftest.py wrap these builders.

Builders
--------
build_per_expert(model_type, out_dir, ...)  random transformers model saved with save_pretrained():
    the per-expert hub layout (transformers v5 un-fuses its experts on save). Keys, per layer L and
    expert M (verified on transformers 5.24 in tests/test_checkpoints.py):

    mixtral:   model.layers.L.block_sparse_moe.experts.M.w1.weight   [I, H]  gate
               model.layers.L.block_sparse_moe.experts.M.w3.weight   [I, H]  up
               model.layers.L.block_sparse_moe.experts.M.w2.weight   [H, I]  down
               model.layers.L.block_sparse_moe.gate.weight           [E, H]  router
    qwen3_moe: model.layers.L.mlp.experts.M.gate_proj.weight         [I, H]  (I = moe_intermediate_size)
               model.layers.L.mlp.experts.M.up_proj.weight           [I, H]
               model.layers.L.mlp.experts.M.down_proj.weight         [H, I]
               model.layers.L.mlp.gate.weight                        [E, H]  router
               (+ self_attn.q_norm / k_norm [head_dim])
    olmoe:     same expert / router names as qwen3_moe
               (+ self_attn.q_norm [heads*head_dim], k_norm [kv_heads*head_dim])

    Common to all three: model.embed_tokens.weight, lm_head.weight (untied), model.norm.weight,
    model.layers.L.{input,post_attention}_layernorm.weight, model.layers.L.self_attn.{q,k,v,o}_proj.weight.
    In memory (and after from_pretrained) transformers holds them fused: mlp.experts.gate_up_proj
    [E, 2I, H] (gate half first) and mlp.experts.down_proj [E, H, I]; Mixtral's `block_sparse_moe`
    becomes `mlp`.

build_gpt_oss_mxfp4(out_dir, ...)  tiny gpt-oss in the hub MXFP4 layout (see DESIGN.md and
    examples/make_tiny_gpt_oss.py), made from a random transformers GptOssForCausalLM whose expert
    weights go through the reference quantizer. The in-memory model (`make_gpt_oss_model`) has its
    experts replaced by the dequantized values, so it equals what transformers loads back.

Helpers
-------
dequantized_reference(path)  every tensor of a gpt-oss MXFP4 checkpoint under transformers' names, the
    experts dequantized with transformers' own `_convert_moe_packed_tensors` ([E, H, 2I] / [E, I, H]).
read_checkpoint(path)        all tensors of a checkpoint folder (index or single file; never original/).
logits(model_dir, **kw)      transformers logits for fixed input ids (float32 by default; an mxfp4
    config.json gets Mxfp4Config(dequantize=True) automatically).
loading_info(model_dir, **kw)  transformers' loading report (missing/unexpected/mismatched keys, errors).

Loading MXFP4 on CPU: `Mxfp4Config(dequantize=True)` needs neither accelerate, kernels nor triton.
Without it, transformers 5.24 raises `ImportError: Using mxfp4 requires Accelerate` when accelerate is
absent; with accelerate present it warns (no triton / use_kernels=False on CPU) and dequantizes anyway.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SCRIPT = REPO / "examples" / "make_tiny_gpt_oss.py"
EXAMPLE_DIR = REPO / "examples" / "tiny-gpt-oss"


def _load_example_module():
    name = "make_tiny_gpt_oss"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The reference quantizer and the fixture writer live in the example script (one copy of the code).
_ex = _load_example_module()
FP4_VALUES = _ex.FP4_VALUES
MXFP4_QUANTIZATION_CONFIG = _ex.MXFP4_QUANTIZATION_CONFIG
GARBAGE_SAFETENSORS = _ex.GARBAGE_SAFETENSORS
quantize_mxfp4 = _ex.quantize_mxfp4
dequantize_mxfp4 = _ex.dequantize_mxfp4
save_sharded = _ex.save_sharded
write_ignored_copies = _ex.write_ignored_copies
make_tiny_gpt_oss = _ex.make_tiny_gpt_oss

PER_EXPERT_FAMILIES = ("qwen3_moe", "mixtral", "olmoe")

# Per family: config fields (beyond the common ones) and the saved per-expert key names.
_FAMILY = {
    "qwen3_moe": {
        "experts_field": "num_experts",
        "config": dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            head_dim=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "moe": "mlp",
        "router": "gate",
        "expert": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    },
    "mixtral": {
        "experts_field": "num_local_experts",
        "config": dict(intermediate_size=16, head_dim=8),
        "moe": "block_sparse_moe",
        "router": "gate",
        "expert": {"gate": "w1", "up": "w3", "down": "w2"},
    },
    "olmoe": {
        "experts_field": "num_experts",
        "config": dict(intermediate_size=16, norm_topk_prob=False),
        "moe": "mlp",
        "router": "gate",
        "expert": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    },
}
_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    max_position_embeddings=256,
)


def expert_key(model_type: str, layer: int, expert: int, role: str) -> str:
    """Saved key of one expert matrix; role in {"gate", "up", "down"}."""
    f = _FAMILY[model_type]
    return f"model.layers.{layer}.{f['moe']}.experts.{expert}.{f['expert'][role]}.weight"


def router_key(model_type: str, layer: int) -> str:
    if model_type == "gpt_oss":
        return f"model.layers.{layer}.mlp.router.weight"
    f = _FAMILY[model_type]
    return f"model.layers.{layer}.{f['moe']}.{f['router']}.weight"


def per_expert_config(model_type: str, *, layers: int = 2, experts: int = 4):
    from transformers import AutoConfig

    f = _FAMILY[model_type]
    kw = {**_COMMON, **f["config"], f["experts_field"]: experts, "num_hidden_layers": layers}
    return AutoConfig.for_model(model_type, **kw)


def _reinit_(model: torch.nn.Module, seed: int) -> None:
    """Seeded normal re-init of every parameter (transformers' init leaves norms at 1 and biases at 0):
    norms ~ 1 + N(0, .1), embeddings ~ N(0, 1), routers / sinks ~ N(0, .5), the rest ~ N(0, .1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                mean, std = 1.0, 0.1
            elif "embed_tokens" in name:
                mean, std = 0.0, 1.0
            elif ".gate." in name or ".router." in name or name.endswith("sinks"):
                mean, std = 0.0, 0.5
            else:
                mean, std = 0.0, 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)


def make_per_expert_model(
    model_type: str, *, layers: int = 2, experts: int = 4, seed: int = 0, dtype: torch.dtype = torch.bfloat16
):
    """The model `build_per_expert` saves, deterministic in its arguments, held in float32 with every
    parameter rounded to `dtype`: `.to(dtype)` is what gets saved, and its float32 logits equal those of
    the checkpoint loaded with dtype=float32 bit for bit (casting the whole model to bf16 would also
    round the rotary inv_freq buffer, which a reload recomputes)."""
    if model_type not in _FAMILY:
        raise ValueError(f"model_type must be one of {PER_EXPERT_FAMILIES}, got {model_type!r}")
    return seeded_model(per_expert_config(model_type, layers=layers, experts=experts), seed=seed, dtype=dtype)


def seeded_model(config, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """The model of `config` in float32, re-initialized by `_reinit_(seed)`, every parameter rounded to
    `dtype` (see make_per_expert_model), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))
    return model.eval()


def build_per_expert(
    model_type: str,
    out_dir: str | Path,
    *,
    layers: int = 2,
    experts: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write a tiny per-expert `model_type` checkpoint (qwen3_moe | mixtral | olmoe) to out_dir.

    With max_shard_size (e.g. "20KB") save_pretrained writes model-0000i-of-0000n.safetensors + index.
    Keys: see the module docstring and `expert_key` / `router_key`.
    """
    out = Path(out_dir)
    model = make_per_expert_model(model_type, layers=layers, experts=experts, seed=seed, dtype=dtype).to(dtype)
    model.config.dtype = dtype
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kw)
    return out


# ------------------------------------------------------------------------------------------------
# gpt-oss MXFP4
# ------------------------------------------------------------------------------------------------
def gpt_oss_config(*, layers: int = 2, experts: int = 4, hidden: int = 64, intermediate: int = 64, vocab: int = 128):
    from transformers import GptOssConfig

    if hidden % 32 or intermediate % 32:
        raise ValueError("hidden and intermediate must be multiples of 32 (MXFP4 blocks)")
    return GptOssConfig(
        num_hidden_layers=layers,
        num_local_experts=experts,
        hidden_size=hidden,
        intermediate_size=intermediate,
        vocab_size=vocab,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def make_gpt_oss_model(
    *, layers: int = 2, experts: int = 4, hidden: int = 64, intermediate: int = 64, vocab: int = 128, seed: int = 0
):
    """Random GptOssForCausalLM with MXFP4-representable experts and bf16-representable everything else,
    held in float32 (see make_per_expert_model for why).

    Returns (model, hub_tensors): hub_tensors maps every checkpoint key to its tensor, experts as
    blocks/scales U8, the rest (biases included) bf16, in write order.
    """
    from transformers import AutoModelForCausalLM

    config = gpt_oss_config(layers=layers, experts=experts, hidden=hidden, intermediate=intermediate, vocab=vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinit_(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    hub: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                # transformers: gate_up_proj [E, H, 2I], down_proj [E, I, H]; hub rows are the transpose
                rows = _ex.expert_weight(gen, (p.shape[0], p.shape[2], p.shape[1]))  # [E, 2I, H] | [E, H, I]
                blocks, scales = quantize_mxfp4(rows)  # [E, rows, in/32, 16], [E, rows, in/32]
                p.copy_(dequantize_mxfp4(blocks, scales).transpose(1, 2))  # [E, H, 2I] | [E, I, H]
                hub[name + "_blocks"], hub[name + "_scales"] = blocks, scales
            else:
                p.copy_(p.to(torch.bfloat16))  # round now: the in-memory model equals the checkpoint
                hub[name] = p.detach().to(torch.bfloat16).clone()
    return model.eval(), hub


def build_gpt_oss_mxfp4(
    out_dir: str | Path,
    *,
    layers: int = 2,
    experts: int = 4,
    hidden: int = 64,
    intermediate: int = 64,
    vocab: int = 128,
    seed: int = 0,
    shards: int = 2,
) -> Path:
    """Write a tiny gpt-oss checkpoint in the hub MXFP4 layout (sharded, index, quantization_config,
    original/ + metal/ junk). The config.json is transformers' own (v5 field names) + quantization_config;
    examples/tiny-gpt-oss has the hub's 4.55-era field names instead."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, hub = make_gpt_oss_model(
        layers=layers, experts=experts, hidden=hidden, intermediate=intermediate, vocab=vocab, seed=seed
    )
    save_sharded(hub, out, shards)
    model.config.dtype = torch.bfloat16
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    _ex.write_json(out / "config.json", config)
    _ex.write_json(out / "generation_config.json", _ex.GENERATION_CONFIG)
    write_ignored_copies(out)
    return out


# ------------------------------------------------------------------------------------------------
# Reading and checking
# ------------------------------------------------------------------------------------------------
def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, per its index if there is one (never original/)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return [path / "model.safetensors"]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def read_header(file: str | Path) -> dict:
    """Raw safetensors JSON header of one file."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def dequantized_reference(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A gpt-oss MXFP4 checkpoint as transformers holds it after Mxfp4Config(dequantize=True):
    `X_blocks` + `X_scales` -> `X` = transformers' `_convert_moe_packed_tensors` (gate_up_proj
    [E, H, 2I], down_proj [E, I, H]) in `dtype`; every other tensor as stored."""
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    raw = read_checkpoint(path)
    out: dict[str, torch.Tensor] = {}
    for k, t in raw.items():
        if k.endswith("_scales"):
            continue
        if k.endswith("_blocks"):
            base = k.removesuffix("_blocks")
            out[base] = _convert_moe_packed_tensors(t, raw[base + "_scales"], dtype=dtype)
        else:
            out[k] = t
    return out


def input_ids(vocab: int = 128, length: int = 12) -> torch.Tensor:
    """Fixed token ids, [1, length], spread over the vocabulary (longer than the gpt-oss sliding window)."""
    return ((torch.arange(length) * 37 + 3) % vocab).unsqueeze(0)


def _with_defaults(model_dir: str | Path, kw: dict) -> dict:
    kw = dict(kw)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == "mxfp4" and "quantization_config" not in kw:
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    return kw


def load_model(model_dir: str | Path, **from_pretrained_kwargs):
    """(model, loading_info) from transformers, eval mode, float32 unless `dtype` is given."""
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.float32, **_with_defaults(model_dir, from_pretrained_kwargs)}
    model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True, **kw)
    return model.eval(), info


def model_logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = input_ids(model.config.vocab_size) if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def logits(model_dir: str | Path, *, ids: torch.Tensor | None = None, **from_pretrained_kwargs) -> torch.Tensor:
    """Logits [1, T, V] of the checkpoint for `input_ids()` (float32 compute unless `dtype` is given)."""
    model, _ = load_model(model_dir, **from_pretrained_kwargs)
    return model_logits(model, ids)


def loading_info(model_dir: str | Path, **from_pretrained_kwargs) -> dict:
    """transformers' report: {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}."""
    _, info = load_model(model_dir, **from_pretrained_kwargs)
    return info


def assert_clean_load(info: dict) -> None:
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"transformers loading report is not empty: {problems}"
