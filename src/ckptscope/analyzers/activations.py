"""Running a checkpoint as a `transformers` model and reading activations out of it.

The activation analyzers (convergence, memorization) share this: building the model from the
checkpoint directory in the checkpoint's dtype on the requested device, finding the sub-layers
to hook in each architecture, and batching token sequences. The last loaded model is kept, so
two analyzers of the same step load it once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckptscope.analyzers.contract import AnalysisContext
from ckptscope.errors import SourceError
from ckptscope.sources.checkpoint import Checkpoint
from ckptscope.sources.layers import family

CAUSAL, MASKED = "causal", "masked"
COMPONENTS = ("resid", "attn_out", "mlp_out")

# Module-name suffixes of each component. `resid` is the whole block's output (the residual
# stream after block ℓ, HF `hidden_states[ℓ+1]` except at the last block, where HF returns it
# after the final norm); attn_out/mlp_out are the sub-layers' outputs before they are added to
# it. GPT-NeoX/Llama/OLMo name blocks `layers.N`, GPT-2 `h.N`, BERT `layer.N` (where the
# sub-layer output is the dense projection before the residual LayerNorm).
_SITE_PATTERNS: dict[str, re.Pattern] = {
    "resid": re.compile(r"(?:^|\.)(?:layers|h|layer)\.(\d+)$"),
    "attn_out": re.compile(r"(?:^|\.)(?:(?:layers|h)\.(\d+)\.(?:attention|self_attn|attn)|layer\.(\d+)\.attention\.output\.dense)$"),
    "mlp_out": re.compile(r"(?:^|\.)(?:(?:layers|h)\.(\d+)\.mlp|layer\.(\d+)\.output\.dense)$"),
}
_FINAL_NORMS = ("final_layer_norm", "norm", "ln_f")  # GPT-NeoX, Llama/OLMo, GPT-2


@dataclass(frozen=True)
class Site:
    """One hooked module: its name in the model, its block index and component."""

    module: str
    layer: int
    component: str


@dataclass
class LoadedModel:
    """A checkpoint built as a `transformers` model, in eval mode on its device."""

    module: torch.nn.Module
    kind: str  # CAUSAL or MASKED
    dtype: torch.dtype  # of the computation
    stored_dtype: torch.dtype
    device: str
    vocab_size: int

    @property
    def dtype_label(self) -> str:
        """The computation's dtype, saying when half-precision weights were upcast (CPU)."""
        compute = str(self.dtype).removeprefix("torch.")
        if self.dtype == self.stored_dtype:
            return compute
        return f"{compute} (weights stored as {str(self.stored_dtype).removeprefix('torch.')}, upcast on {self.device})"

    def sites(self) -> list[Site]:
        """Every block's resid/attn_out/mlp_out module, by layer then component."""
        found = []
        for name, _ in self.module.named_modules():
            for component, pattern in _SITE_PATTERNS.items():
                m = pattern.search(name)
                if m:
                    found.append(Site(name, int(next(g for g in m.groups() if g is not None)), component))
        if not any(s.component == "resid" for s in found):
            raise SourceError(f"found no transformer blocks in {type(self.module).__name__}; activation analyzers support "
                              "GPT-NeoX, Llama-family, OLMo, GPT-2 and BERT layouts")
        return sorted(found, key=lambda s: (s.layer, COMPONENTS.index(s.component)))

    def max_positions(self) -> int | None:
        return getattr(self.module.config, "max_position_embeddings", None)

    def final_norm(self) -> torch.nn.Module | None:
        """The norm between the last block and the unembedding, for the logit lens."""
        return next((m for n in _FINAL_NORMS if isinstance(m := getattr(self.module.base_model, n, None), torch.nn.Module)), None)


def backend(device: str) -> str:
    import transformers

    return f"torch-{torch.__version__}/transformers-{transformers.__version__}/{device}"


def tokenizer_dirs(ctx: AnalysisContext) -> list[Path]:
    """Where a checkpoint's tokenizer may be: its own directory, the final step's, the run's root."""
    dirs = [ctx.checkpoint.path] + ([ctx.final.path] if ctx.final is not None else []) + [ctx.checkpoint.path.parent]
    return list(dict.fromkeys(dirs))


def model_kind(config: dict | None, path: Path) -> str:
    """Causal or masked LM, from config.json; refuses what `transformers` could not build."""
    if not config or not config.get("model_type"):
        raise SourceError(f"{path}: no config.json with a model_type, so transformers cannot build the model; "
                          "activation analyzers need one (the weights analyzer does not)")
    architectures = config.get("architectures") or []
    if family(config) == "bert" or any(a.endswith("ForMaskedLM") for a in architectures):
        return MASKED
    return CAUSAL


def stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The floating dtype most of the checkpoint's tensors are stored in."""
    counts: dict[str, int] = {}
    for info in ckpt.tensors.values():
        if info.dtype.startswith(("float", "bfloat")):
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
    return getattr(torch, max(counts, key=counts.get)) if counts else torch.float32


def compute_dtype(stored: torch.dtype, device: str) -> torch.dtype:
    """The checkpoint's dtype, except half precision on CPU, where matmuls are slow or unsupported."""
    if torch.device(device).type == "cpu" and stored in (torch.float16, torch.bfloat16):
        return torch.float32
    return stored


_last: tuple[tuple, LoadedModel] | None = None  # the most recently loaded model, shared by analyzers


def load_model(ckpt: Checkpoint, device: str) -> LoadedModel:
    """Build the checkpoint with `transformers` (reusing the last model when it is the same one)."""
    global _last
    key = (str(ckpt.path.resolve()), device, tuple(f.stat().st_mtime_ns for f in ckpt.files))
    if _last is not None and _last[0] == key:
        return _last[1]
    _last = None  # release the previous model before building the next
    model = build_model(ckpt, device)
    _last = (key, model)
    return model


def build_model(ckpt: Checkpoint, device: str) -> LoadedModel:
    """A fresh model from the checkpoint directory; one-line errors for what cannot be built."""
    import transformers
    from transformers.utils import logging as hf_logging

    kind = model_kind(ckpt.config, ckpt.path)
    stored = stored_dtype(ckpt)
    dtype = compute_dtype(stored, device)
    auto = transformers.AutoModelForMaskedLM if kind == MASKED else transformers.AutoModelForCausalLM
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        module, info = auto.from_pretrained(str(ckpt.path), dtype=dtype, output_loading_info=True)
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SourceError(f"{ckpt.path}: transformers cannot build this model ({first}); "
                          "activation analyzers need it, the weights analyzer does not") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SourceError(f"{ckpt.path}: {len(missing)} parameter(s) the model needs are not in the checkpoint "
                          f"(e.g. {missing[0]}); it would run with random weights")
    module = module.to(device).eval()
    return LoadedModel(module, kind, dtype, stored, device, module.get_input_embeddings().num_embeddings)


@contextmanager
def capture(model: torch.nn.Module, sites: list[Site]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that keep each site's latest output (the first element when it is a tuple)."""
    outputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str):
        def keep(_module, _inputs, output):
            outputs[name] = output[0] if isinstance(output, tuple) else output
        return keep

    handles = [modules[s.module].register_forward_hook(hook(s.module)) for s in sites]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def padded_batches(tokens: list[np.ndarray], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask) batches, shortest sequences first to limit padding.

    The order is deterministic, so batch b holds the same positions at every step (the CKA
    cache of the reference step relies on it).
    """
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [tokens[i] for i in order[start : start + batch_size]]
        width = max(len(t) for t in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, t in enumerate(chunk):
            ids[row, : len(t)] = torch.from_numpy(np.asarray(t, dtype=np.int64))
            mask[row, : len(t)] = 1
        batches.append((ids, mask))
    return batches
