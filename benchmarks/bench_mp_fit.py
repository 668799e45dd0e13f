"""Cost of the `mp_fit` and `sparsity` analyzers per Pythia-shaped step, and WeightWatcher's on the same matrices.

A GPT-NeoX with Pythia's shapes and random weights is saved as real fp16 safetensors (one step).
Timed, on one thread (OMP_NUM_THREADS=1 recommended, as the pipeline's eigensolve runs):

* `mp_fit` computing its own spectra (one float64 Gram eigensolve per matrix);
* `mp_fit` reusing spectra left in `ctx.shared` (as after `weights`): the MP fit, entropy and alpha fit only;
* `sparsity` (one bucketed pass per matrix, every 2-D tensor including the embeddings);
* WeightWatcher `analyze(mp_fit=True)` on the matrices mp_fit analyzes (160m only unless --ww-all; it is slow).

Run: `python benchmarks/bench_mp_fit.py [--sizes 160m,410m] [--ww]`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.analyzers.mp_fit import MPFitAnalyzer
from ckptscope.analyzers.sparsity import SparsityAnalyzer
from ckptscope.analyzers.spectral import singular_values
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import classify, family, orient

SHAPES = {"70m": (512, 6, 8, 2048), "160m": (768, 12, 12, 3072), "410m": (1024, 24, 16, 4096)}  # hidden, layers, heads, inter


def build(size: str, root: Path) -> tuple[torch.nn.Module, Checkpoint]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, inter = SHAPES[size]
    cfg = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                        vocab_size=50304, rotary_pct=0.25, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg).eval()
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    state["embed_out.weight"] = state.pop("lm_head.weight")
    d = root / size
    d.mkdir()
    cfg.to_json_file(d / "config.json")
    save_file(state, str(d / "model.safetensors"))
    return model, Checkpoint(d, step=1000)


def ctx_for(ckpt: Checkpoint) -> AnalysisContext:
    return AnalysisContext(checkpoint=ckpt, family=family(ckpt.config), config=ckpt.config)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="160m,410m")
    parser.add_argument("--ww", action="store_true", help="also time WeightWatcher (mp_fit=True) on the same matrices")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            model, ckpt = build(size, Path(tmp))
            analyzer = MPFitAnalyzer()
            names = analyzer.matrices(ctx_for(ckpt))
            t_own, rows = timed(lambda: analyzer.analyze(ctx_for(ckpt)))
            shared = ctx_for(ckpt)
            t_sv, _ = timed(lambda: shared.shared.update(
                {("sv", n, classify(n, shared.family).component): singular_values(orient(n, shared.family, ckpt.read(n)))
                 for n in names}))
            t_reuse, rows2 = timed(lambda: analyzer.analyze(shared))
            t_sp, _ = timed(lambda: SparsityAnalyzer().analyze(ctx_for(ckpt)))
            print(f"{size}: {len(names)} matrices; mp_fit own spectra {t_own:.1f} s, reusing spectra {t_reuse:.1f} s "
                  f"(the eigensolves alone {t_sv:.1f} s); sparsity {t_sp:.1f} s over {sum(len(i.shape) == 2 for i in ckpt.tensors.values())} matrices")
            assert rows.metrics["value"] == rows2.metrics["value"] or np.allclose(rows.metrics["value"], rows2.metrics["value"])
            if args.ww:
                import weightwatcher as ww

                logging.disable(logging.WARNING)
                warnings.simplefilter("ignore")
                t_ww, _ = timed(lambda: ww.WeightWatcher(model=model).analyze(mp_fit=True))
                print(f"{size}: WeightWatcher analyze(mp_fit=True) {t_ww:.1f} s on the same {len(names)} matrices")


if __name__ == "__main__":
    main()
