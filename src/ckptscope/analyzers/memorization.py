"""The memorization analyzer: Pythia's memorization score of every corpus sequence at every step.

Exactly as in EleutherAI's `eval_memorization.py`: the first `prompt_len` (32) tokens are the
prompt, greedy decoding produces exactly `continuation_len` (32) new tokens, the score is the
fraction equal to the true continuation and a sequence is memorized iff the score is 1. Pythia
called `generate(min_length=64)`, which also forbids the EOS token until the end, so EOS is
suppressed here too (`suppressed_tokens` in the provenance).

One teacher-forced forward pass over prompt + true continuation gives, at once, the loss of the
true continuation, the logit lens (each block's residual stream through the final norm and the
unembedding: how early the true tokens become the top prediction), the first greedy token and
the prompt's KV cache, which greedy decoding then extends one token at a time.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ckptscope.analyzers.activations import CAUSAL, LoadedModel, Site, backend, capture, load_model, tokenizer_dirs
from ckptscope.analyzers.contract import AnalysisContext, Analyzer
from ckptscope.analyzers.corpus import Sequences, check_vocab, load_corpus, require_length
from ckptscope.errors import CkptscopeError
from ckptscope.options import Options, at_least, option
from ckptscope.rows import RunRows, Table


def kv_cache(out: Any) -> Any:
    """The KV cache of a model output: `cache` in transformers 5 (where reading `past_key_values`
    warns that it is deprecated), `past_key_values` before."""
    return out["cache"] if "cache" in out else out.past_key_values


def greedy_continuation(module: torch.nn.Module, cache: Any, logits: torch.Tensor, steps: int,
                        suppressed: list[int]) -> torch.Tensor:
    """`steps` greedy tokens after a prompt whose KV `cache` and last-position `logits` are given."""
    # transformers 5 renamed forward's `past_key_values` to `cache` (the old name warns); 4.x knows only the old one.
    cache_arg = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    tokens = []
    for i in range(steps):
        scores = logits.float()  # argmax in float32, as `generate` takes it
        scores[:, suppressed] = -math.inf
        nxt = scores.argmax(-1)
        tokens.append(nxt)
        if i + 1 < steps:
            out = module(input_ids=nxt[:, None], use_cache=True, **{cache_arg: cache})
            cache, logits = kv_cache(out), out.logits[:, -1]
    return torch.stack(tokens, 1)


@dataclass(frozen=True)
class MemorizationOptions(Options):
    corpus: Path = option(help="Sequences (JSONL, Parquet or .npy) to test for memorization.", digest=True)
    prompt_len: int = option(32, check=at_least(1), help="Prompt tokens given to the model.")
    continuation_len: int = option(32, check=at_least(1), help="Tokens generated greedily and compared with the truth.")
    batch_size: int = option(16, check=at_least(1), affects_results=False, help="Sequences per forward pass.")


MEMORIZATION = Table(
    "memorization",
    {"sequence_id": "VARCHAR NOT NULL -- the corpus row's id",
     "score": "DOUBLE NOT NULL -- fraction of the continuation reproduced by greedy decoding",
     "memorized": "BOOLEAN NOT NULL -- score = 1",
     "loss": "DOUBLE -- mean cross-entropy (nats/token) of the true continuation",
     "first_seen_step": "BIGINT -- when the sequence was trained on, if the corpus says"},
    key=("sequence_id",),
    doc="Pythia memorization score per sequence and step.",
    views=("""CREATE OR REPLACE VIEW memorization_summary AS
SELECT model, step, count(*) AS sequences, avg(memorized::INTEGER) AS memorized_rate,
       avg(score) AS mean_score, avg(loss) AS mean_loss
FROM memorization GROUP BY model, step""",),
)


class MemorizationAnalyzer(Analyzer):
    """Pythia memorization score, continuation loss and per-layer logit lens per corpus sequence."""

    name = "memorization"
    version = "1.0.0"
    Options = MemorizationOptions
    tables = (MEMORIZATION,)
    unit = "batches"

    def __init__(self, options: MemorizationOptions) -> None:
        super().__init__(options)
        self.corpus = load_corpus(options.corpus, "corpus")
        self.prompt_len, self.continuation_len, self.batch_size = options.prompt_len, options.continuation_len, options.batch_size
        self._seqs: Sequences | None = None
        self._skipped = 0

    def check(self, config: dict | None) -> None:
        self.corpus.check_vocab(config)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "decoding": "greedy, exactly continuation_len tokens",
                "logit_lens": "resid through final norm and unembedding, teacher-forced"}

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        model = load_model(ctx.checkpoint, ctx.device)
        suppressed = self._suppressed(model)
        out = self.new_rows(model.dtype_label, backend(ctx.device), suppressed_tokens=suppressed)
        if model.kind != CAUSAL:
            out.anomalies.append((None, "not_applicable", f"memorization needs a causal LM; {ctx.checkpoint.path.name} is a masked LM"))
            return out
        seqs = self._prepare(ctx, model)
        out.parameters["sequences"], out.parameters["skipped_short"] = len(seqs), self._skipped
        if self._skipped:
            out.anomalies.append((None, "short_sequences", f"{self._skipped} of {len(seqs) + self._skipped} corpus sequences are "
                                  f"shorter than {self.prompt_len + self.continuation_len} tokens and were skipped"))
        sites = [s for s in model.sites() if s.component == "resid"]
        if model.final_norm() is None:
            out.anomalies.append((None, "no_logit_lens", "no final norm found, so the logit lens is not computed"))
            sites = []
        length = self.prompt_len + self.continuation_len
        scores, losses, hits = [], [], torch.zeros(len(sites), dtype=torch.long)
        n_batches = math.ceil(len(seqs) / self.batch_size)
        ctx.progress.start(n_batches)
        for b in range(n_batches):
            rows = seqs.tokens[b * self.batch_size : (b + 1) * self.batch_size]
            ids = torch.from_numpy(np.stack([np.asarray(t[:length], dtype=np.int64) for t in rows]))
            s, l, h = self._batch(model, ids, sites, suppressed)
            scores.append(s)
            losses.append(l)
            hits += h
            ctx.progress.advance()
        score = torch.cat(scores).tolist()
        loss = [v if math.isfinite(v) else None for v in torch.cat(losses).tolist()]
        out.tables["memorization"] = {"sequence_id": list(seqs.ids), "score": score, "memorized": [v == 1.0 for v in score],
                                      "loss": loss, "first_seen_step": list(seqs.first_seen_step)}
        for site, count in zip(sites, hits.tolist()):
            out.add_metrics(site.module, site.layer, site.component,
                            {"memorization_logit_lens": count / (len(seqs) * self.continuation_len)})
        return out

    def _suppressed(self, model: LoadedModel) -> list[int]:
        """EOS ids, which `generate(min_length=...)` forbids before the last token, as in Pythia's evaluation."""
        config = getattr(model.module, "generation_config", None) or model.module.config
        eos = getattr(config, "eos_token_id", None)
        ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        return sorted({int(i) for i in ids if 0 <= int(i) < model.vocab_size})

    def _prepare(self, ctx: AnalysisContext, model: LoadedModel) -> Sequences:
        """Corpus sequences long enough for prompt + continuation (once per run), checked against this model."""
        length = self.prompt_len + self.continuation_len
        if model.max_positions() and length > model.max_positions():
            raise CkptscopeError(f"--prompt-len + --continuation-len = {length} exceeds the model's {model.max_positions()} positions")
        if self._seqs is None:
            self._seqs, self._skipped = require_length(self.corpus.sequences(tokenizer_dirs(ctx)), length, self.corpus.path)
        check_vocab(self._seqs, model.vocab_size, self.corpus.path)
        return self._seqs

    def _batch(self, model: LoadedModel, ids: torch.Tensor, sites: list[Site],
               suppressed: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, continuation losses, logit-lens hits per site) of one batch of equal-length sequences."""
        p, c = self.prompt_len, self.continuation_len
        ids = ids.to(model.device)
        targets = ids[:, p:]
        with torch.no_grad():
            with capture(model.module, sites) as resid:
                out = model.module(input_ids=ids, use_cache=True, logits_to_keep=c + 1)
            logits = out.logits[:, :c].float()  # positions p−1 … p+c−2 predict the continuation
            loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
            norm, head = model.final_norm(), model.module.get_output_embeddings()
            hits = torch.tensor([int((head(norm(resid[s.module][:, p - 1 : p + c - 1])).argmax(-1) == targets).sum())
                                 for s in sites], dtype=torch.long)
            cache = kv_cache(out)
            cache.crop(-c)  # drop the true continuation: keep the prompt's keys and values
            generated = greedy_continuation(model.module, cache, out.logits[:, 0], c, suppressed)
        score = (generated == targets).float().mean(1)
        return score.cpu(), loss.cpu(), hits
