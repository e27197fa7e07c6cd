"""`edge-metastone inspect FILE.gguf [--json]`: architecture, sizes, tensor types, SPRM head."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_metastone.commands import add_weight_buffers, print_json
from edge_metastone.modelfile.about import about
from edge_metastone.modelfile.read import ModelFile, open_model_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser("inspect", help="describe a model GGUF and its SPRM head")
    p.add_argument("model", type=Path, metavar="FILE.gguf")
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding the head")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_weight_buffers(p)
    p.set_defaults(run=run)


def describe(mf: ModelFile, prompt: dict[str, object]) -> dict[str, object]:
    """The facts `inspect` shows, as a JSON-ready dict; `prompt`: the vocabulary's own
    (`engine.prompt_facts`), whose step and think ids are the rule the engine uses."""
    head = None
    if mf.head is not None:
        head = {
            "source": str(mf.head_source),
            "hidden_size": mf.head.hidden_size,
            "inner_size": int(mf.head.fc1_weight.shape[0]),
            "feature_layer": mf.head.feature_layer,
            "dtype": mf.head.dtype,
            "parameters": int(
                mf.head.fc1_weight.size + mf.head.fc1_bias.size + mf.head.fc2_weight.size + 1
            ),
        }
    return {
        "path": str(mf.path),
        "architecture": mf.arch,
        "name": mf.name,
        "layers": mf.n_layers,
        "hidden_size": mf.n_embd,
        "feed_forward": mf.n_ff,
        "heads": mf.n_heads,
        "kv_heads": mf.n_kv_heads,
        "vocab": mf.n_vocab,
        "context_length": mf.context_length,
        "parameters": mf.n_params,
        "tensor_bytes": mf.n_bytes,
        "tensor_types": mf.tensor_types,
        "sprm_head": head,
        "step_token_ids": prompt["step_token_ids"],
        "think_ids": prompt["think_tags"] or [-1, -1],
        "about": about(
            mf.path, mf.head_source
        ).to_json(),  # from the provenance: task, domain, head quality
        "prompt": prompt,
    }


def model_facts(mf: ModelFile) -> dict[str, object]:
    """`describe` with the prompt facts of the file's vocabulary (loaded alone: no weights)."""
    from edge_metastone.engine.engine import prompt_facts
    from edge_metastone.engine.llama import Model

    with Model(mf.path, vocab_only=True) as vocab:
        return describe(mf, prompt_facts(mf, vocab))


def _about_lines(a: dict) -> list[str]:
    """What the provenance says the model can do and how far its head can be trusted."""
    lines = []
    if a["task"]:
        lines.append(f"task (provenance): {a['task']}")
    if a["domain"]:
        lines.append(f"can do: {a['domain']}; other prompts get a number all the same")
    if a["head_auc_within"] is not None:
        verdict = "informative" if a["head_informative"] else "not informative on this model"
        lines.append(
            f"SPRM head measured: within-problem AUC {a['head_auc_within']:.2f} ({verdict}; "
            f"mean log-prob {a['logprob_auc_within'] or 0:.2f}); steps are shown by "
            + ("their SPRM score" if a["head_informative"] else "the model's own confidence")
        )
    return lines


def _prompt_lines(p: dict) -> list[str]:
    """How prompts are written: the chat format, BOS/EOS, think tags, the step delimiter."""

    def special(add: bool, text: str | None, key: str) -> str:
        if text is None:
            return "none"
        return f"{text!r} " + ("added to raw prompts" if add else "not added") + f" ({key})"

    think = p["think_tags"]
    return [
        f"prompt format: {p['prompt_format_reason']}",
        f"BOS {special(p['add_bos'], p['bos'], 'add_bos_token')}; "
        f"EOS {special(p['add_eos'], p['eos'], 'add_eos_token')}",
        f"think tags: <think>/</think> ids {think}"
        if think
        else "think tags: none (no think window: every step is scored)",
        f"step delimiter: {p['step_delimiter']}, ids {_ids(p['step_token_ids'])}",
    ]


def _ids(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 8 else f"[{', '.join(map(str, ids[:8]))}, ...]"


def run(args: argparse.Namespace) -> int:
    """Print the description."""
    from edge_metastone.engine.weights.plan import plan_for  # loads llama.cpp

    mf = open_model_file(args.model, args.head)
    d = model_facts(mf)
    d["weight_buffers"] = plan_for(mf.path, args.weight_buffers).plan.to_json()  # how it loads here
    if args.json:
        print_json(d, indent=2)
        return 0
    print(f"{d['path']}: {d['architecture']} '{d['name']}'")
    print(
        f"  layers {d['layers']}, hidden {d['hidden_size']}, ffn {d['feed_forward']}, "
        f"heads {d['heads']}/{d['kv_heads']} kv, vocab {d['vocab']}, context {d['context_length']}"
    )
    print(f"  {d['parameters'] / 1e6:.1f}M parameters in {d['tensor_bytes'] / 2**20:.1f} MiB")
    types = ", ".join(f"{k} x{v}" for k, v in sorted(d["tensor_types"].items()))
    print(f"  tensor types: {types}")
    head = d["sprm_head"]
    if head is None:
        print("  SPRM head: none (generation works; step scoring is unavailable)")
    else:
        print(
            f"  SPRM head: {head['hidden_size']} -> {head['inner_size']} -> 1 ({head['dtype']}, "
            f"{head['parameters']} parameters) on layer {head['feature_layer']}, from {head['source']}"
        )
    for line in _prompt_lines(d["prompt"]):
        print(f"  {line}")
    for line in _about_lines(d["about"]):
        print(f"  {line}")
    wb = d["weight_buffers"]
    repacked = f", {wb['repacked']} weights in CPU_REPACK" if wb["mode"] == "repack" else ""
    print(f"  weight buffers here: {wb['mode']}{repacked} ({wb['requested']}: {wb['reason']})")
    return 0
