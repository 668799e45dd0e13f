"""Per-head OV/QK circuits against the maps the real transformers attention modules compute.

The oracle never slices weights: it runs each model's own attention forward on basis vectors with a
capturing attention function registered in transformers' `AttentionInterface`, so the per-head
query/key/value maps are whatever the model's own reshapes make of them, and the output projection
is probed through the model's own merge of heads. Rotary embeddings are made the identity
(cos = 1, sin = 0), the relative-position-0 circuit the analyzer reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptscope.analyzers.circuits import CircuitsAnalyzer
from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family

transformers = pytest.importorskip("transformers")
CAPTURE = "ckptscope_test_capture"
_state: dict[str, torch.Tensor] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    """Record the per-head states the module computed; return the head outputs the test chose."""
    _state.update(q=query, k=key, v=value)
    return _state["out"], None


transformers.AttentionInterface.register(CAPTURE, _capture)


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    return {
        "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                             intermediate_size=64, vocab_size=64, max_position_embeddings=32)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)),
        # GQA (4 query heads, 2 key/value heads) and d_head = 16 ≠ hidden/heads
        "llama": lambda: LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                                      vocab_size=64, attention_bias=True)),
    }


def _attention(model, fam: str, layer: int):
    return {"gpt_neox": lambda: model.gpt_neox.layers[layer].attention, "gpt2": lambda: model.transformer.h[layer].attn,
            "llama": lambda: model.model.layers[layer].self_attn}[fam]()


def _run(attn, fam: str, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One forward of the attention module on (batch, 1, d) inputs with head outputs `out`."""
    _state["out"] = out
    batch = hidden.shape[0]
    if fam == "gpt2":
        return attn(hidden)[0]
    rot = attn.rotary_ndims if fam == "gpt_neox" else attn.head_dim
    identity = (torch.ones(batch, 1, rot, dtype=hidden.dtype), torch.zeros(batch, 1, rot, dtype=hidden.dtype))
    return attn(hidden, attention_mask=None, position_embeddings=identity)[0]


def oracle(model, fam: str, layer: int, heads: int, d_head: int) -> dict[str, list[np.ndarray]]:
    """Per head, the d_model × d_model OV (W_O^h W_V^h) and QK (W_Q^hᵀ W_K^h) matrices, probed."""
    from transformers.models.llama.modeling_llama import repeat_kv

    attn = _attention(model, fam, layer)
    d = model.config.hidden_size
    dt = torch.float64
    with torch.no_grad():
        # inputs 0, e_1 … e_d: responses minus the response to 0 are the linear maps without biases
        x = torch.cat([torch.zeros(1, d, dtype=dt), torch.eye(d, dtype=dt)])[:, None, :]
        _run(attn, fam, x, torch.zeros(d + 1, 1, heads, d_head, dtype=dt))
        q, k, v = _state["q"], _state["k"], _state["v"]  # (batch, heads, 1, d_head)
        k, v = repeat_kv(k, heads // k.shape[1]), repeat_kv(v, heads // v.shape[1])  # the model's own GQA mapping
        maps = {n: (t[1:, :, 0, :] - t[:1, :, 0, :]).permute(1, 0, 2).numpy() for n, t in (("q", q), ("k", k), ("v", v))}
        # head outputs 0 and one-hot (h, c): the output projection's column for head h, dimension c
        n = heads * d_head
        hot = torch.cat([torch.zeros(1, n, dtype=dt), torch.eye(n, dtype=dt)]).reshape(n + 1, 1, heads, d_head)
        y = _run(attn, fam, torch.zeros(n + 1, 1, d, dtype=dt), hot)[:, 0, :]
        w_o = (y[1:] - y[:1]).reshape(heads, d_head, d).numpy()  # [h, c, :] = W_O[:, (h, c)]
    return {"attn.ov": [w_o[h].T @ maps["v"][h].T for h in range(heads)],
            "attn.qk": [maps["q"][h] @ maps["k"][h].T for h in range(heads)]}


def expected_metrics(m: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    s = np.linalg.svd(m, compute_uv=False)
    p = s[s > 0] / s[s > 0].sum()
    fro = np.linalg.norm(m)
    return {"frobenius_norm": fro, "spectral_norm": s[0], "stable_rank": fro**2 / s[0] ** 2,
            "effective_rank": float(np.exp(-np.sum(p * np.log(p))))}, s


def analyzed(path: Path):
    ckpt = Checkpoint(path, step=0)
    ctx = AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config)
    return CircuitsAnalyzer().analyze(ctx)


@pytest.mark.parametrize("fam", ["gpt_neox", "gpt2", "llama"])
def test_circuits_match_the_models_own_attention(fam, tmp_path):
    torch.manual_seed(0)
    model = _models()[fam]().double().eval()  # eval: no dropout in the probes
    with torch.no_grad():  # off the initialisation: every weight random, biases non-zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_attn_implementation(CAPTURE)
    model.save_pretrained(tmp_path)
    rows = analyzed(tmp_path)
    assert not rows.anomalies
    cfg = model.config
    heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    metrics = {(r[1], r[2], r[6], r[3]): (r[0], r[4], r[5]) for r in zip(*(rows.metrics[c] for c in
               ("tensor", "layer", "component", "metric", "value", "tier", "head")))}
    spectra = {(r[1], r[2], r[7]): (r[0], r[3], r[4], r[5], r[6], np.array(r[8])) for r in zip(*(rows.spectra[c] for c in
               ("tensor", "layer", "component", "kind", "rows", "cols", "tier", "head", "sv")))}
    layers = cfg.num_hidden_layers
    assert len(spectra) == layers * 2 * heads and len(metrics) == layers * 2 * heads * 4
    names = {"gpt_neox": ("attention.dense.weight", "attention.query_key_value.weight"),
             "gpt2": ("attn.c_proj.weight", "attn.c_attn.weight"), "llama": ("self_attn.o_proj.weight", "self_attn.q_proj.weight")}[fam]
    for layer in range(layers):
        for component, mats in oracle(model, fam, layer, heads, d_head).items():
            for h, m in enumerate(mats):
                want, s = expected_metrics(m)
                tensor, kind, n_rows, n_cols, tier, sv = spectra[(layer, component, h)]
                assert tensor.endswith(f"{layer}.{names[component == 'attn.qk']}") and (kind, tier) == ("weight", "exact")
                assert (n_rows, n_cols) == m.shape and sv.shape == (d_head,)
                np.testing.assert_allclose(sv, s[:d_head], rtol=1e-9, atol=1e-12 * s[0])
                assert np.all(s[d_head:] < 1e-12 * s[0])  # the product's rank is d_head at most
                for metric, value in want.items():
                    got_tensor, got, tier = metrics[(layer, component, h, metric)]
                    assert got_tensor == tensor and tier == "exact"
                    assert got == pytest.approx(value, rel=1e-9), (component, h, metric)


def test_heads_that_do_not_fit_the_config_are_an_anomaly_not_an_error(tmp_path):
    torch.manual_seed(0)
    _models()["gpt_neox"]().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_attention_heads"] = 5  # 32 is not divisible by 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    rows = analyzed(tmp_path)
    assert not rows.metrics["value"] and not rows.spectra["sv"]
    assert [(t.split(".")[-3:], kind) for t, kind, _ in rows.anomalies] == [(["attention", "dense", "weight"], "circuits_skipped")] * 2
    assert all("not divisible by 5 heads" in detail for _, _, detail in rows.anomalies)
