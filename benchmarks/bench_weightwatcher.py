"""ckptscope versus WeightWatcher, side by side, on checkpoints with Pythia's exact shapes.

For each of pythia-70m, -160m, -410m: random weights with the real shapes are saved as real
fp16 safetensors at steps 0, 500, 1000 and 2000; step 1000 is the one analyzed, so that it has
a first, a previous and a final step distinct from it, as in the middle of a sweep. Then,
alternating, several repeats:

1. *common work*: the matrices WeightWatcher analyzes (its Linear layers; it skips the
   50,304-row embeddings) and the metrics it reports (alpha, alpha_weighted, log_norm,
   log_spectral_norm, stable_rank). WeightWatcher gets the model already in memory;
   ckptscope reads each matrix from the safetensors file inside the timed region.
2. *full step*: everything ckptscope's weight analyzer stores for step 1000 (embeddings,
   QKV split, deltas to steps 0 and 500, distance to step 2000, alpha, spectra) through the
   real `ckptscope.ingest` (the other steps are ingested too, untimed), against
   WeightWatcher's smaller job on the same checkpoint.

Values are checked to agree (norms and stable rank to 1e-6 relative, alpha to 1e-3 where both
choose the same x_min). Run: `python benchmarks/bench_weightwatcher.py [--sizes 70m,160m] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import ckptscope
from ckptscope.analyzers.parallel import ordered_map
from ckptscope.analyzers.spectral import heavy_tail_metrics, rank_norm_metrics, singular_values
from ckptscope.sources.checkpoint import Checkpoint

SHAPES = {  # hidden, layers, heads, intermediate (Pythia configs), vocab 50304
    "70m": (512, 6, 8, 2048),
    "160m": (768, 12, 12, 3072),
    "410m": (1024, 24, 16, 4096),
}
WW_METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "stable_rank")


def build(size: str, root: Path) -> tuple[torch.nn.Module, Path]:
    """A GPT-NeoX model with Pythia's shapes and random weights, saved at steps 0, 500, 1000 and 2000."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, inter = SHAPES[size]
    cfg = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                        vocab_size=50304, rotary_pct=0.25, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg).eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    state["embed_out.weight"] = state.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(1)
    for step, scale in ((0, 0.0), (500, 0.005), (1000, 0.01), (2000, 0.02)):
        d = root / f"step{step}"
        d.mkdir(parents=True)
        cfg.to_json_file(d / "config.json")
        moved = {k: (v.float() + scale * torch.randn(v.shape, generator=gen)).half() for k, v in state.items()}
        save_file(moved, str(d / "model.safetensors"))
    final = {k: v.float() for k, v in load_state(root / "step1000").items()}
    final["lm_head.weight"] = final.pop("embed_out.weight")
    model.load_state_dict(final, strict=False)  # WeightWatcher sees exactly the step 1000 values
    return model, root


def load_state(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path, step=0)
    return {n: ck.read(n) for n in ck.tensors}


def ww_matrices(model: torch.nn.Module) -> list[str]:
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.shape[0] <= 50000
            and m.weight.shape[1] <= 50000 and n != "lm_head"]


def run_weightwatcher(model: torch.nn.Module):
    import weightwatcher as ww

    return ww.WeightWatcher(model=model).analyze()


def run_ckptscope_common(path: Path, names: list[str], device: str = "cpu") -> dict[str, dict[str, float]]:
    """WeightWatcher's metrics on its matrices, read from disk, as the weight analyzer runs them
    (`ordered_map` on CPU, one matrix at a time on a GPU)."""
    ck = Checkpoint(path, step=1000)

    def metrics(name: str) -> dict[str, float]:
        sv = singular_values(ck.read(name).to(device))
        return {**rank_norm_metrics(sv), **heavy_tail_metrics(sv)}

    threads = torch.get_num_threads() if device == "cpu" else 1
    jobs = ordered_map(names, metrics, lambda n: ck.tensors[n].nbytes, threads=threads)
    return dict(jobs)


def compare(details, ours: dict[str, dict[str, float]]) -> tuple[int, int, float, float]:
    """(matrices compared, alpha comparisons with the same x_min, worst norm rel. error, worst alpha abs. error)."""
    worst_norm, worst_alpha, same_xmin = 0.0, 0.0, 0
    for _, row in details.iterrows():
        mine = ours[f"{row['longname']}.weight"]
        for m in ("log_norm", "log_spectral_norm", "stable_rank"):
            worst_norm = max(worst_norm, abs(mine[m] - row[m]) / abs(row[m]))
        if np.isclose(mine["alpha_xmin"], row["xmin"], rtol=1e-6):
            same_xmin += 1
            worst_alpha = max(worst_alpha, abs(mine["alpha"] - row["alpha"]))
    return len(details), same_xmin, worst_norm, worst_alpha


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="70m,160m,410m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where ckptscope runs (cpu, cuda); WeightWatcher stays on CPU")
    args = ap.parse_args()
    print(f"# {date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, ckptscope {ckptscope.__version__}, ckptscope device {args.device}")
    rows = []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model, root = build(size, Path(tmp))
            names = ww_matrices(model)
            ww_t, ck_t, full_t = [], [], []
            for _ in range(args.repeats):
                t, details = timed(lambda: run_weightwatcher(model))
                ww_t.append(t)
                t, ours = timed(lambda: run_ckptscope_common(root / "step1000", names, args.device))
                ck_t.append(t)
                store = Path(tmp) / "bench.duckdb"
                store.unlink(missing_ok=True)
                report = ckptscope.ingest(root, store=store, steps="500,1000", force=True, device=args.device,
                                          analyzers="weights")  # and 0, 2000: references
                full_t.append(report.filter(report["step"] == 1000)["seconds"].item())
            n, same, worst_norm, worst_alpha = compare(details, ours)
            w, c, f = statistics.median(ww_t), statistics.median(ck_t), statistics.median(full_t)
            rows.append((size, n, w, c, w / c, f, w / f, same, worst_norm, worst_alpha))
    print("| model | matrices | WeightWatcher s | ckptscope common s | speed-up | ckptscope full step s | WW s / full s "
          "| same x_min | max rel. err norms | max abs. err alpha |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, n, w, c, ratio, f, ratio_full, same, en, ea in rows:
        print(f"| pythia-{size} | {n} | {w:.2f} | {c:.2f} | {ratio:.1f}x | {f:.2f} | {ratio_full:.2f} | {same}/{n} | {en:.1e} | {ea:.1e} |")


if __name__ == "__main__":
    main()
