"""Map checkpoint parameter names to (layer, component) and split fused QKV weights.

Checkpoint suites name the same architectural role differently (``attention.dense`` in
GPT-NeoX, ``self_attn.o_proj`` in Llama, ``attn.c_proj`` in GPT-2 ...). Analyzers compare
roles across layers and across suites, so every tensor is reduced to a block index and one
of a small, fixed set of components. Fused QKV matrices are additionally split so that
query, key and value can be tracked separately, which needs the exact row layout each
implementation uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

COMPONENTS: tuple[str, ...] = (
    "attn.qkv",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "mlp.in",
    "mlp.gate",
    "mlp.out",
    "embed",
    "unembed",
    "norm",
    "bias",
    "other",
)

# config.json "model_type" -> family. OLMo 1/2/3, Mistral, Qwen2, TinyLlama, SmolLM and
# Amber all use Llama's module names (q/k/v/o_proj, gate/up/down_proj).
_MODEL_TYPES: dict[str, str] = {
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "olmo": "llama",
    "olmo2": "llama",
    "olmo3": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "bert": "bert",
}


def family(config: dict | None) -> str:
    """Return the architecture family whose naming rules apply to a HF ``config.json`` dict."""
    if not config:
        return "unknown"
    return _MODEL_TYPES.get(str(config.get("model_type") or "").lower(), "unknown")


def is_buffer(name: str) -> bool:
    """True for tensors that are saved alongside weights but are not trained parameters.

    Old GPT-2 / GPT-NeoX pickles carry causal-mask buffers named ``attn.bias`` /
    ``attention.bias`` (bool/uint8, shaped like the context window) next to real biases
    such as ``attn.c_attn.bias``, so the test is on whole path segments, never a suffix string.
    """
    parts = name.split(".")
    leaf = parts[-1]
    if leaf in ("masked_bias", "position_ids", "token_type_ids") or leaf.endswith("inv_freq"):
        return True
    return len(parts) >= 2 and leaf == "bias" and parts[-2] in ("attn", "attention")


@dataclass(frozen=True)
class Role:
    """Where a tensor sits in the network: a block index and its component."""

    layer: int | None  # block index, None for embeddings/final norm/head
    component: str  # one of COMPONENTS


# Per family: (module-path suffix regex, component of its weight). A module path is the
# parameter name without its final ".weight"/".bias"; patterns match whole trailing segments,
# so an optional "transformer."/"bert."/"model." prefix is irrelevant.
_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_neox": (
        (r"embed_in", "embed"),
        (r"input_layernorm|post_attention_layernorm|final_layer_norm", "norm"),
        (r"attention\.query_key_value", "attn.qkv"),
        (r"attention\.dense", "attn.o"),
        (r"mlp\.dense_h_to_4h", "mlp.in"),
        (r"mlp\.dense_4h_to_h", "mlp.out"),
        # transformers >= 5 loads "embed_out" as "lm_head" but still saves "embed_out".
        (r"embed_out|lm_head", "unembed"),
    ),
    "llama": (
        (r"embed_tokens", "embed"),
        (r"self_attn\.q_proj", "attn.q"),
        (r"self_attn\.k_proj", "attn.k"),
        (r"self_attn\.v_proj", "attn.v"),
        (r"self_attn\.o_proj", "attn.o"),
        (r"mlp\.gate_proj", "mlp.gate"),
        (r"mlp\.up_proj", "mlp.in"),
        (r"mlp\.down_proj", "mlp.out"),
        # input/post_attention/post_feedforward layernorms, OLMo-2 q_norm/k_norm, model.norm
        (r"\w*norm", "norm"),
        (r"lm_head", "unembed"),
    ),
    "gpt2": (
        # Cross-attention's c_attn holds only K and V; it is not a 3-way fused QKV.
        (r"crossattention\.\w+", "other"),
        (r"wte|wpe", "embed"),
        (r"ln_1|ln_2|ln_f|ln_cross_attn", "norm"),
        (r"attn\.c_attn", "attn.qkv"),
        (r"attn\.c_proj", "attn.o"),
        (r"mlp\.c_fc", "mlp.in"),
        (r"mlp\.c_proj", "mlp.out"),
        (r"lm_head", "unembed"),
    ),
    "bert": (
        (r"embeddings\.(?:word|position|token_type)_embeddings", "embed"),
        (r"LayerNorm", "norm"),
        (r"attention\.self\.query", "attn.q"),
        (r"attention\.self\.key", "attn.k"),
        (r"attention\.self\.value", "attn.v"),
        (r"attention\.output\.dense", "attn.o"),
        (r"intermediate\.dense", "mlp.in"),
        (r"layer\.\d+\.output\.dense", "mlp.out"),
        (r"cls\.predictions\.decoder", "unembed"),
        (r"pooler\.dense|cls\.predictions\.transform\.dense|cls\.seq_relationship", "other"),
    ),
}

_COMPILED: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    fam: tuple((re.compile(rf"(?:.*\.)?(?:{pat})"), comp) for pat, comp in rules)
    for fam, rules in _RULES.items()
}

_BLOCK_SEGMENTS = frozenset({"layers", "layer", "h", "blocks", "block"})
_LN_SEGMENT = re.compile(r"ln(?:_\w+|\d+)?")  # ln, ln_1, ln_f, ln2


def _layer_index(parts: list[str]) -> int | None:
    """Block index: the integer after a block-container segment, else the first integer segment."""
    for prev, seg in zip(parts, parts[1:]):
        if prev in _BLOCK_SEGMENTS and seg.isdigit():
            return int(seg)
    return next((int(seg) for seg in parts if seg.isdigit()), None)


def _guess_component(parts: list[str]) -> str:
    """Name-only fallback for architectures without explicit rules."""
    lowered = [p.lower() for p in parts]
    if any("norm" in p or _LN_SEGMENT.fullmatch(p) for p in lowered):
        return "norm"
    if lowered[-1] == "bias":
        return "bias"
    # Checked before "embed", which "unembed" contains.
    if any(p in ("lm_head", "unembed", "embed_out") for p in lowered):
        return "unembed"
    if any("embed" in p for p in lowered):
        return "embed"
    return "other"


def classify(name: str, family: str) -> Role:
    """Assign a parameter name to its block and component under ``family``'s naming rules.

    Biases of linear layers collapse into one "bias" component (they are tiny and analysed
    together); a norm's bias stays "norm" because it belongs to the normalisation's affine map.
    """
    parts = name.split(".")
    layer = _layer_index(parts)
    leaf = parts[-1]
    module = ".".join(parts[:-1]) if leaf in ("weight", "bias") else name
    for pattern, component in _COMPILED.get(family, ()):
        if pattern.fullmatch(module):
            if leaf == "bias" and component != "norm":
                component = "bias"
            return Role(layer, component)
    return Role(layer, _guess_component(parts))


# GPT-2's Conv1D modules store their weight as (in_features, out_features).
_CONV1D_MODULES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


def orient(name: str, family: str, w: torch.Tensor) -> torch.Tensor:
    """Return ``w`` as (out_features, in_features), transposing GPT-2 Conv1D weights as a view."""
    parts = name.split(".")
    if (
        family == "gpt2"
        and w.ndim == 2
        and parts[-1] == "weight"
        and len(parts) >= 2
        and parts[-2] in _CONV1D_MODULES
    ):
        return w.t()
    return w


def _config_int(config: dict, *keys: str) -> int:
    """First present key among aliases (GPT-2 configs say n_embd/n_head)."""
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise ValueError(f"config lacks {' / '.join(keys)}, needed to split fused QKV")


def split_qkv(
    role: Role, family: str, w: torch.Tensor, config: dict
) -> list[tuple[str, torch.Tensor]]:
    """Split an oriented (out, in) fused QKV weight into query, key and value matrices.

    GPT-NeoX interleaves per head: rows are (head, {q,k,v}, d_head), matching its forward's
    ``view(..., heads, 3*head_size).chunk(3)``; gathering one part across heads is a strided
    pick that needs a copy to become 2-D. GPT-2's ``c_attn`` output is [q | k | v] in
    contiguous thirds, so those parts are views. Anything that is not a fused QKV weight
    (biases included) yields [].
    """
    if role.component != "attn.qkv" or w.ndim != 2:
        return []
    hidden = _config_int(config, "hidden_size", "n_embd")
    heads = _config_int(config, "num_attention_heads", "n_head")
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
    if tuple(w.shape) != (3 * hidden, hidden):
        raise ValueError(
            f"fused QKV weight has shape {tuple(w.shape)}, expected {(3 * hidden, hidden)} "
            f"(out, in) for hidden size {hidden}; was it passed through orient()?"
        )
    if family == "gpt_neox":
        per_head = w.view(heads, 3, hidden // heads, hidden)
        parts = [per_head[:, i].reshape(hidden, hidden) for i in range(3)]
    elif family == "gpt2":
        parts = list(w.split(hidden, dim=0))
    else:
        raise ValueError(f"no fused QKV layout known for family {family!r}")
    return list(zip(("attn.q", "attn.k", "attn.v"), parts))
