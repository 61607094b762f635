"""A LoRA fine-tuning step of a small Llama-style model (random weights, built from a config) with
``lora_dropout`` 0, PEFT's dropout at 0.1, and the same adapters after ``dropkit.convert``: the bytes
autograd keeps for backward and the step time.

Bytes: the distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks`` during one
training forward, parameters excluded (they exist anyway). ``lora_input_bytes`` adds up the input
of every LoRA layer: one activation-sized tensor per layer, the copy PEFT's dropout keeps. Step:
forward, causal-LM loss, backward and an AdamW step on the adapters, the three variants timed
round-robin (``dropkit.lab.bench.median_times``) on the same tokens; ratios are against ``peft``.

    python benchmarks/lora_step.py --out benchmarks/results/lora_step_saved_bytes.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_time import median_cpu_seconds  # noqa: E402
from vision_shim import import_torchvision  # noqa: E402

import_torchvision()  # transformers imports torchvision when it is installed

import peft  # noqa: E402
import transformers  # noqa: E402

import dropkit  # noqa: E402
from dropkit.lab.bench import emit_json, environment, median_times  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(rate: float, convert: bool, args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                      max_position_embeddings=args.seq)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=rate,
                                                target_modules=TARGETS))
    if convert:
        dropkit.convert(model)
    return model.train()


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> dict:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    lora_inputs: list[int] = []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = [m.register_forward_hook(lambda mod, inp, out: lora_inputs.append(inp[0].numel() * inp[0].element_size()))
             for m in model.modules() if isinstance(m, peft.tuners.lora.layer.Linear)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=tokens, labels=tokens).loss
    for hook in hooks:
        hook.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved_bytes": sum(storages.values()), "lora_layers": len(lora_inputs),
            "lora_input_bytes": sum(lora_inputs)}


def step_fn(model: torch.nn.Module, tokens: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="also the median CPU seconds per step (best with --threads 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    models = {"dropout0": build(0.0, False, args), "peft": build(args.rate, False, args),
              "dropkit": build(args.rate, True, args)}
    memory = {name: saved_bytes(model, tokens) for name, model in models.items()}
    layers = memory["dropkit"]["lora_layers"]
    load_before = os.getloadavg()[0]
    steps = {name: step_fn(model, tokens) for name, model in models.items()}
    times = median_times(steps, args.repeats, min_sample_s=0.0)
    cpu = median_cpu_seconds(steps, args.repeats) if args.cpu_time else None
    result = {
        "benchmark": "lora_step",
        "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab",
                                                "batch", "seq", "rank", "rate", "repeats")},
        "targets": TARGETS,
        "environment": environment(),
        "memory": memory,
        "dropkit_over_dropout0_bytes": round(memory["dropkit"]["saved_bytes"] / memory["dropout0"]["saved_bytes"], 4),
        "peft_minus_dropkit_bytes": memory["peft"]["saved_bytes"] - memory["dropkit"]["saved_bytes"],
        "peft_minus_dropkit_per_lora_layer_in_activations":
            round((memory["peft"]["saved_bytes"] - memory["dropkit"]["saved_bytes"])
                  / memory["dropkit"]["lora_input_bytes"], 3) if layers else None,
        "seconds": {k: round(v, 5) for k, v in times.items()},
        "dropkit_over_peft_time": round(times["dropkit"] / times["peft"], 3),
        "dropout0_over_peft_time": round(times["dropout0"] / times["peft"], 3),
        "cpu_seconds": None if cpu is None else {k: round(v, 5) for k, v in cpu.items()},
        "dropkit_over_peft_cpu": None if cpu is None else round(cpu["dropkit"] / cpu["peft"], 3),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": "machine shared with other jobs: variants timed round-robin; load averages recorded",
    }
    return emit_json(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
