"""Builders of real local training runs on disk, for tests.

Weights come from real `transformers` models (so parameter names are the real ones); each
"step" perturbs the previous weights, and files are written with the real safetensors and
torch serializers in the layouts published suites use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

NEOX = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96,
            max_position_embeddings=64, tie_word_embeddings=False)


def neox_config(num_layers: int | None = None) -> "transformers.GPTNeoXConfig":  # noqa: F821
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**{**NEOX, **({"num_hidden_layers": num_layers} if num_layers else {})})


def neox_state(seed: int = 0, num_layers: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A freshly initialised tiny GPT-NeoX state dict with the names save_pretrained writes.

    `num_layers` overrides NEOX's depth, for tests that compare models of different depth.
    """
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = neox_config(num_layers)
    model = GPTNeoXForCausalLM(cfg)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if "lm_head.weight" in state:  # transformers 5 names the head lm_head in memory, embed_out on disk
        state["embed_out.weight"] = state.pop("lm_head.weight")
    config = cfg.to_dict()
    config["architectures"] = ["GPTNeoXForCausalLM"]
    return state, config


def trajectory(state: dict[str, torch.Tensor], steps: list[int], seed: int = 1, scale: float = 0.02) -> dict[int, dict[str, torch.Tensor]]:
    """Weights at each step: a random walk away from `state` (step 0 = `state`)."""
    gen = torch.Generator().manual_seed(seed)
    out, current = {}, {k: v.clone() for k, v in state.items()}
    for step in steps:
        if step > 0:
            current = {k: v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in current.items()}
        out[step] = {k: v.clone() for k, v in current.items()}
    return out


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict | None, *, fmt: str = "safetensors",
                     shards: int = 1, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write one checkpoint directory in the layout HF uses for `fmt` and `shards`."""
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, str(path / fname), metadata={"format": "pt"})
        else:
            torch.save(part, path / fname)
        weight_map.update({k: fname for k in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": weight_map}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return path


def write_run(root: Path, states: dict[int, dict[str, torch.Tensor]], config: dict | None, *,
              layout: str = "step{}", **kw) -> Path:
    """A run directory with one checkpoint directory per step."""
    for step, state in states.items():
        write_checkpoint(root / layout.format(step), state, config, **kw)
    return root
