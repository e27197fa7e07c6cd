"""Write a random Qwen2-shaped MetaStone checkpoint of a chosen size (bf16 safetensors shards + head).

    python bench/make_synthetic_checkpoint.py OUT_DIR --preset 1b

Weights are random (this is for conversion memory/speed and runtime throughput, not quality);
the tokenizer is the tiny test fixture's, padded to the model's vocab by the converter.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures.make_tiny_metastone import build_tiny_metastone

PRESETS = {
    # ~1.0B parameters: Qwen2-1.5B-like widths with fewer layers
    "1b": dict(hidden=2048, ffn=5632, layers=16, heads=16, kv_heads=2, vocab=151936),
    # ~0.2B parameters, memory-bound on a laptop CPU in Q4_0 (runtime benchmarks)
    "200m": dict(hidden=1024, ffn=2816, layers=12, heads=16, kv_heads=4, vocab=32000),
}


def layer_shapes(h: int, f: int, kv: int) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of one decoder layer."""
    return {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.q_proj.bias": (h,),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }


def rand(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (torch.randn(shape, generator=gen) * (shape[-1] ** -0.5)).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--shard-gb", type=float, default=1.0)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    h, f, n_layers, heads, kvh, vocab = (
        p["hidden"],
        p["ffn"],
        p["layers"],
        p["heads"],
        p["kv_heads"],
        p["vocab"],
    )
    kv = kvh * (h // heads)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_metastone(Path(tmp) / "tiny", head=False)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((tiny / name).read_bytes())
        tok_cfg = json.loads((tiny / "config.json").read_text())

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(n_layers):
        for k, s in layer_shapes(h, f, kv).items():
            shapes[f"model.layers.{i}.{k}"] = s
    shapes["model.norm.weight"] = (h,)

    limit = int(args.shard_gb * 2**30)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    plan: list[list[str]] = [[]]
    for name, s in shapes.items():
        nbytes = 2 * int(torch.tensor(s).prod()) if s else 2
        if size + nbytes > limit and plan[-1]:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    n_params = 0
    for k, names in enumerate(plan):
        fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {n: rand(shapes[n], gen) for n in names}
        n_params += sum(t.numel() for t in tensors.values())
        save_file(tensors, str(out / fname))
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    del shards
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kvh,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": tok_cfg.get("bos_token_id"),
        "eos_token_id": tok_cfg.get("eos_token_id"),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    head = torch.nn.Sequential(
        torch.nn.Linear(h, 2 * h), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * h, 1)
    )
    torch.save(
        {k: v.detach().to(torch.bfloat16) for k, v in head.state_dict().items()},
        out / "score_module.pt",
    )
    print(f"wrote {out}: {n_params / 1e9:.3f}B parameters in {len(plan)} bf16 shards")


if __name__ == "__main__":
    main()
