"""Tests for ckptscope.sources.layers against the parameter names real transformers models produce.

Names come from tiny models built by the installed transformers, both from ``state_dict()``
and from the safetensors file ``save_pretrained`` writes, because the two differ (tied
weights are dropped on save; GPT-NeoX's head is ``lm_head`` in memory but ``embed_out`` on
disk). QKV splits are checked against the query/key/value states the attention modules
themselves compute.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.gpt_neox import modeling_gpt_neox

from ckptscope.sources.layers import (
    COMPONENTS,
    Role,
    classify,
    family,
    is_buffer,
    orient,
    split_qkv,
)

HIDDEN, LAYERS, HEADS = 32, 2, 4
SMALL = dict(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS)


def _neox(**kw) -> transformers.PreTrainedModel:
    return transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**SMALL, intermediate_size=64, **kw)
    )


def _gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=16
    )


def _bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(**SMALL, intermediate_size=64, max_position_embeddings=16)


def _llama_family() -> list[transformers.PreTrainedModel]:
    common = dict(SMALL, intermediate_size=64)
    models = [
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_key_value_heads=2)),
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True)),
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)),  # q/k/v biases
        transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common)),
    ]
    if hasattr(transformers, "Olmo3ForCausalLM"):
        models.append(transformers.Olmo3ForCausalLM(transformers.Olmo3Config(**common)))
    return models


# Expected component per name template ("{i}" = block index). Layer is the block index for
# templates containing "{i}", else None.
NEOX = {
    "gpt_neox.embed_in.weight": "embed",
    "gpt_neox.layers.{i}.input_layernorm.weight": "norm",
    "gpt_neox.layers.{i}.input_layernorm.bias": "norm",
    "gpt_neox.layers.{i}.post_attention_layernorm.weight": "norm",
    "gpt_neox.layers.{i}.post_attention_layernorm.bias": "norm",
    "gpt_neox.layers.{i}.attention.query_key_value.weight": "attn.qkv",
    "gpt_neox.layers.{i}.attention.query_key_value.bias": "bias",
    "gpt_neox.layers.{i}.attention.dense.weight": "attn.o",
    "gpt_neox.layers.{i}.attention.dense.bias": "bias",
    "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight": "mlp.in",
    "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias": "bias",
    "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight": "mlp.out",
    "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias": "bias",
    "gpt_neox.final_layer_norm.weight": "norm",
    "gpt_neox.final_layer_norm.bias": "norm",
    "embed_out.weight": "unembed",  # on disk (and in Pythia checkpoints)
    "lm_head.weight": "unembed",  # in transformers 5 state_dict()
}
LLAMA = {
    "model.embed_tokens.weight": "embed",
    "model.layers.{i}.self_attn.q_proj.weight": "attn.q",
    "model.layers.{i}.self_attn.k_proj.weight": "attn.k",
    "model.layers.{i}.self_attn.v_proj.weight": "attn.v",
    "model.layers.{i}.self_attn.o_proj.weight": "attn.o",
    "model.layers.{i}.self_attn.q_proj.bias": "bias",
    "model.layers.{i}.self_attn.k_proj.bias": "bias",
    "model.layers.{i}.self_attn.v_proj.bias": "bias",
    "model.layers.{i}.self_attn.q_norm.weight": "norm",
    "model.layers.{i}.self_attn.k_norm.weight": "norm",
    "model.layers.{i}.mlp.gate_proj.weight": "mlp.gate",
    "model.layers.{i}.mlp.up_proj.weight": "mlp.in",
    "model.layers.{i}.mlp.down_proj.weight": "mlp.out",
    "model.layers.{i}.input_layernorm.weight": "norm",
    "model.layers.{i}.post_attention_layernorm.weight": "norm",
    "model.layers.{i}.post_feedforward_layernorm.weight": "norm",
    "model.norm.weight": "norm",
    "lm_head.weight": "unembed",
}
GPT2 = {  # also checked with the "transformer." prefix
    "wte.weight": "embed",
    "wpe.weight": "embed",
    "h.{i}.ln_1.weight": "norm",
    "h.{i}.ln_1.bias": "norm",
    "h.{i}.attn.c_attn.weight": "attn.qkv",
    "h.{i}.attn.c_attn.bias": "bias",
    "h.{i}.attn.c_proj.weight": "attn.o",
    "h.{i}.attn.c_proj.bias": "bias",
    "h.{i}.ln_2.weight": "norm",
    "h.{i}.ln_2.bias": "norm",
    "h.{i}.mlp.c_fc.weight": "mlp.in",
    "h.{i}.mlp.c_fc.bias": "bias",
    "h.{i}.mlp.c_proj.weight": "mlp.out",
    "h.{i}.mlp.c_proj.bias": "bias",
    "ln_f.weight": "norm",
    "ln_f.bias": "norm",
    "lm_head.weight": "unembed",
}
BERT = {  # also checked with the "bert." prefix
    "embeddings.word_embeddings.weight": "embed",
    "embeddings.position_embeddings.weight": "embed",
    "embeddings.token_type_embeddings.weight": "embed",
    "embeddings.LayerNorm.weight": "norm",
    "embeddings.LayerNorm.bias": "norm",
    "encoder.layer.{i}.attention.self.query.weight": "attn.q",
    "encoder.layer.{i}.attention.self.query.bias": "bias",
    "encoder.layer.{i}.attention.self.key.weight": "attn.k",
    "encoder.layer.{i}.attention.self.key.bias": "bias",
    "encoder.layer.{i}.attention.self.value.weight": "attn.v",
    "encoder.layer.{i}.attention.self.value.bias": "bias",
    "encoder.layer.{i}.attention.output.dense.weight": "attn.o",
    "encoder.layer.{i}.attention.output.dense.bias": "bias",
    "encoder.layer.{i}.attention.output.LayerNorm.weight": "norm",
    "encoder.layer.{i}.attention.output.LayerNorm.bias": "norm",
    "encoder.layer.{i}.intermediate.dense.weight": "mlp.in",
    "encoder.layer.{i}.intermediate.dense.bias": "bias",
    "encoder.layer.{i}.output.dense.weight": "mlp.out",
    "encoder.layer.{i}.output.dense.bias": "bias",
    "encoder.layer.{i}.output.LayerNorm.weight": "norm",
    "encoder.layer.{i}.output.LayerNorm.bias": "norm",
    "pooler.dense.weight": "other",
    "pooler.dense.bias": "bias",
    "cls.predictions.bias": "bias",
    "cls.predictions.transform.dense.weight": "other",
    "cls.predictions.transform.dense.bias": "bias",
    "cls.predictions.transform.LayerNorm.weight": "norm",
    "cls.predictions.transform.LayerNorm.bias": "norm",
    "cls.predictions.decoder.weight": "unembed",
    "cls.predictions.decoder.bias": "bias",
    "cls.seq_relationship.weight": "other",
    "cls.seq_relationship.bias": "bias",
}

# Buffers found in older checkpoints (Pythia .bin pickles, original GPT-2 weights, BERT <4.31).
LEGACY_BUFFERS = [
    "gpt_neox.layers.0.attention.bias",
    "gpt_neox.layers.5.attention.masked_bias",
    "gpt_neox.layers.0.attention.rotary_emb.inv_freq",
    "h.0.attn.bias",
    "h.3.attn.masked_bias",
    "transformer.h.11.attn.bias",
    "bert.embeddings.position_ids",
    "model.layers.0.self_attn.rotary_emb.inv_freq",
]


def _saved_keys(model: transformers.PreTrainedModel, path: Path) -> set[str]:
    model.save_pretrained(path)
    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys.update(f.keys())
    return keys


def _all_keys(model: transformers.PreTrainedModel, path: Path) -> set[str]:
    return set(model.state_dict()) | _saved_keys(model, path)


def _check_names(
    names: set[str], fam: str, table: dict[str, str], prefix: str = ""
) -> set[str]:
    """Assert each name's role against ``table``; return the templates that were seen."""
    seen = set()
    for name in sorted(names):
        assert not is_buffer(name), name
        template = re.sub(r"\.\d+\.", ".{i}.", name)
        if prefix and template.startswith(prefix):
            template = template[len(prefix) :]
        assert template in table, f"unexpected parameter name {name}"
        match = re.search(r"\.(\d+)\.", name)
        expected = Role(int(match.group(1)) if match else None, table[template])
        assert classify(name, fam) == expected, name
        seen.add(template)
    return seen


def test_components_vocabulary() -> None:
    tables = (NEOX, LLAMA, GPT2, BERT)
    assert {c for t in tables for c in t.values()} <= set(COMPONENTS)
    assert len(set(COMPONENTS)) == len(COMPONENTS)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (None, "unknown"),
        ({}, "unknown"),
        ({"model_type": "t5"}, "unknown"),
        ({"model_type": "gpt_neox"}, "gpt_neox"),
        ({"model_type": "olmo"}, "llama"),
        ({"model_type": "olmo2"}, "llama"),
        ({"model_type": "mistral"}, "llama"),
        ({"model_type": "gpt2"}, "gpt2"),
        ({"model_type": "bert"}, "bert"),
    ],
)
def test_family_from_config(config: dict | None, expected: str) -> None:
    assert family(config) == expected


def test_gpt_neox_names(tmp_path: Path) -> None:
    model = _neox()
    fam = family(model.config.to_dict())
    assert fam == "gpt_neox"
    seen = _check_names(_all_keys(model, tmp_path), fam, NEOX)
    assert seen == set(NEOX)
    assert all(is_buffer(n) for n, _ in model.named_buffers())


def test_llama_family_names(tmp_path: Path) -> None:
    seen: set[str] = set()
    for idx, model in enumerate(_llama_family()):
        fam = family(model.config.to_dict())
        assert fam == "llama", model.config.model_type
        seen |= _check_names(_all_keys(model, tmp_path / str(idx)), fam, LLAMA)
        assert all(is_buffer(n) for n, _ in model.named_buffers())
    assert seen == set(LLAMA)


def test_gpt2_names_with_and_without_prefix(tmp_path: Path) -> None:
    config = _gpt2_config()
    fam = family(config.to_dict())
    assert fam == "gpt2"
    lm_names = _all_keys(transformers.GPT2LMHeadModel(config), tmp_path / "lm")
    assert all(n.startswith(("transformer.", "lm_head.")) for n in lm_names)
    seen = _check_names(lm_names, fam, GPT2, prefix="transformer.")
    seen |= _check_names(_all_keys(transformers.GPT2Model(config), tmp_path / "base"), fam, GPT2)
    assert seen == set(GPT2)


def test_bert_names_with_and_without_prefix(tmp_path: Path) -> None:
    config = _bert_config()
    fam = family(config.to_dict())
    assert fam == "bert"
    seen: set[str] = set()
    for idx, cls in enumerate(
        (transformers.BertForPreTraining, transformers.BertForMaskedLM, transformers.BertModel)
    ):
        model = cls(config)
        seen |= _check_names(_all_keys(model, tmp_path / str(idx)), fam, BERT, prefix="bert.")
        assert all(is_buffer(n) for n, _ in model.named_buffers())
    assert seen == set(BERT)


@pytest.mark.parametrize("name", LEGACY_BUFFERS)
def test_legacy_buffers_are_skipped(name: str) -> None:
    assert is_buffer(name)


@pytest.mark.parametrize(
    "name",
    [
        "h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.bias",
        "gpt_neox.layers.0.attention.dense.bias",
        "gpt_neox.layers.0.attention.query_key_value.bias",
        "bert.encoder.layer.0.attention.output.dense.bias",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
    ],
)
def test_real_biases_are_not_buffers(name: str) -> None:
    assert not is_buffer(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("encoder.blocks.3.ffn.w1", Role(3, "other")),
        ("model.transformer.blocks.7.att_proj.weight", Role(7, "other")),
        ("model.transformer.blocks.7.attn_norm.weight", Role(7, "norm")),
        ("stages.1.layers.4.mlp.bias", Role(4, "bias")),  # block segment beats first integer
        ("decoder.12.ln_2.bias", Role(12, "norm")),  # first integer segment as fallback
        ("layers.2.kiln.weight", Role(2, "other")),  # "ln" only as a whole segment prefix
        ("tok_embeddings.weight", Role(None, "embed")),
        ("output.unembed.weight", Role(None, "unembed")),
        ("lm_head.weight", Role(None, "unembed")),
        ("final_norm.weight", Role(None, "norm")),
    ],
)
def test_unknown_family_heuristics(name: str, expected: Role) -> None:
    assert classify(name, "unknown") == expected


def test_unmatched_name_in_known_family_falls_back() -> None:
    assert classify("gpt_neox.layers.3.extra.weight", "gpt_neox") == Role(3, "other")


def test_orient_gpt2_conv1d_is_a_transposed_view() -> None:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config())
    conv_seen = 0
    for name, w in model.state_dict().items():
        oriented = orient(name, "gpt2", w)
        module_name = name.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        if isinstance(module, transformers.pytorch_utils.Conv1D) and name.endswith(".weight"):
            conv_seen += 1
            assert oriented.data_ptr() == w.data_ptr() and oriented.shape == w.shape[::-1]
            b = module.bias
            xin = torch.randn(5, w.shape[0])  # Conv1D weight is (in, out)
            torch.testing.assert_close(xin @ w + b, xin @ oriented.T + b)
            torch.testing.assert_close(module(xin), xin @ oriented.T + b)
        else:
            assert oriented is w, name
    assert conv_seen == 4 * LAYERS
    # Only GPT-2 uses Conv1D; other families' weights are already (out, in).
    w = torch.zeros(HIDDEN, 3 * HIDDEN)
    assert orient("transformer.h.0.attn.c_attn.weight", "gpt_neox", w) is w


def _capture_attention(monkeypatch: pytest.MonkeyPatch, modeling_module) -> dict[str, torch.Tensor]:
    """Replace the eager attention kernel with one that records the q/k/v it is handed."""
    captured: dict[str, torch.Tensor] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.update(q=query, k=key, v=value)
        return query.transpose(1, 2), None

    monkeypatch.setattr(modeling_module, "eager_attention_forward", capture)
    return captured


def _heads(states: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads*d_head) -> (batch, heads, seq, d_head), as attention consumes it."""
    batch, seq, _ = states.shape
    return states.view(batch, seq, HEADS, -1).transpose(1, 2)


@torch.no_grad()
def test_split_qkv_gpt_neox_matches_module(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _neox(attention_bias=False)
    model.config._attn_implementation = "eager"
    attn = model.gpt_neox.layers[1].attention
    captured = _capture_attention(monkeypatch, modeling_gpt_neox)
    x = torch.randn(2, 5, HIDDEN)
    # cos=1, sin=0 makes the rotary embedding the identity, so q/k are the raw projections.
    head_size = HIDDEN // HEADS
    identity_rope = (torch.ones(2, 5, head_size), torch.zeros(2, 5, head_size))
    attn(x, attention_mask=None, position_embeddings=identity_rope)
    assert set(captured) == {"q", "k", "v"}

    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    role = classify(name, "gpt_neox")
    w = orient(name, "gpt_neox", attn.query_key_value.weight)
    parts = split_qkv(role, "gpt_neox", w, model.config.to_dict())
    assert [p for p, _ in parts] == ["attn.q", "attn.k", "attn.v"]
    for (part, wp), key in zip(parts, "qkv"):
        assert wp.shape == (HIDDEN, HIDDEN)
        torch.testing.assert_close(_heads(x @ wp.T), captured[key], msg=part)
    # The layout is interleaved per head: naive thirds would be wrong.
    assert not torch.allclose(_heads(x @ w[:HIDDEN].T), captured["q"])


@torch.no_grad()
def test_split_qkv_gpt2_matches_module(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = _gpt2_config()
    model = transformers.GPT2Model(config)
    model.config._attn_implementation = "eager"
    attn = model.h[0].attn
    attn.c_attn.bias.zero_()  # split_qkv covers weights only
    captured = _capture_attention(monkeypatch, modeling_gpt2)
    x = torch.randn(2, 5, HIDDEN)
    attn(x)
    assert set(captured) == {"q", "k", "v"}

    name = "h.0.attn.c_attn.weight"
    raw = attn.c_attn.weight
    w = orient(name, "gpt2", raw)
    parts = split_qkv(classify(name, "gpt2"), "gpt2", w, config.to_dict())
    assert [p for p, _ in parts] == ["attn.q", "attn.k", "attn.v"]
    for (part, wp), key in zip(parts, "qkv"):
        assert wp.shape == (HIDDEN, HIDDEN)
        assert wp.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()  # a view
        torch.testing.assert_close(_heads(x @ wp.T), captured[key], msg=part)


def test_split_qkv_ignores_everything_but_fused_weights() -> None:
    config = {"hidden_size": HIDDEN, "num_attention_heads": HEADS}
    bias = torch.zeros(3 * HIDDEN)
    assert split_qkv(Role(0, "bias"), "gpt_neox", bias, config) == []
    assert split_qkv(Role(0, "attn.qkv"), "gpt_neox", bias, config) == []
    assert split_qkv(Role(0, "attn.o"), "gpt_neox", torch.zeros(HIDDEN, HIDDEN), config) == []


FUSED = (3 * HIDDEN, HIDDEN)
NEOX_CONFIG = {"hidden_size": HIDDEN, "num_attention_heads": HEADS}


@pytest.mark.parametrize(
    ("shape", "config", "family_name", "message"),
    [
        ((HIDDEN, 3 * HIDDEN), {"n_embd": HIDDEN, "n_head": HEADS}, "gpt2", "orient"),  # (in, out)
        (FUSED, {**NEOX_CONFIG, "num_attention_heads": 5}, "gpt_neox", "divisible"),
        (FUSED, {"num_attention_heads": HEADS}, "gpt_neox", "hidden_size"),
        (FUSED, {**NEOX_CONFIG, "hidden_size": 2 * HIDDEN}, "gpt_neox", "expected"),
        (FUSED, NEOX_CONFIG, "llama", "layout"),
    ],
)
def test_split_qkv_rejects_mismatched_shapes(
    shape: tuple[int, int], config: dict, family_name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        split_qkv(Role(0, "attn.qkv"), family_name, torch.zeros(shape), config)
