"""Per-sequence statistics: surprisal, top-1 accuracy, rank and entropy of every corpus sequence at every step.

The outcomes of the memorisation profiles of Lesci et al. (ACL 2024), as their
`compute_statistics` defines them. For a sequence x₀…x_n, position i = 0…n−1 predicts x_{i+1}
from ℓ_i = log_softmax(logits_i) (natural log):

* sup_i = −ℓ_i[x_{i+1}] (nats);
* rank_i = #{v : ℓ_i[v] > ℓ_i[x_{i+1}]}, strict, so 0 means top-1 and ties favour the true token;
* H_i = −Σ_v exp(ℓ_i[v]) ℓ_i[v].

Per sequence: sup_seq, avg_rank and entr_seq are the means over its n predicted positions and
acc_seq = #{rank_i = 0} / n. A 2049-token Pythia sequence gives n = 2048 predictions, and its 2048
inputs fit the model's 2048 positions: the last token is only ever a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckptscope.analyzers.activations import CAUSAL, LoadedModel, backend, load_model, padded_batches, tokenizer_dirs
from ckptscope.analyzers.contract import AnalysisContext, Analyzer
from ckptscope.analyzers.corpus import Corpus, Sequences, check_vocab, load_corpus, require_length
from ckptscope.errors import CkptscopeError
from ckptscope.options import Options, at_least, existing_file, option
from ckptscope.rows import RunRows, Table

POSITIONS_PER_CHUNK = 256  # predicted positions whose probabilities exist at once (256 × vocab × 4 bytes, twice)


@dataclass(frozen=True)
class SequenceStatsOptions(Options):
    corpus: Path = option(help="Token sequences to score (Parquet from `ckptscope corpus from-data`, JSONL or .npy).",
                          check=existing_file, digest=True, metavar="FILE")
    batch_size: int = option(4, help="Sequences per forward pass (logits take batch × length × vocab × 4 bytes).",
                             check=at_least(1), affects_results=False)


class SequenceStatsAnalyzer(Analyzer):
    """Mean surprisal, top-1 accuracy, rank and entropy of the true next token, per corpus sequence."""

    name = "sequence_stats"
    version = "1.0.0"
    Options = SequenceStatsOptions
    unit = "batches"
    tables = (Table(
        name="sequence_stats",
        columns={
            "sequence_id": "VARCHAR -- the corpus row's id (`train:<index>` joins back to the data order)",
            "split": "VARCHAR -- train, heldout, or NULL when the corpus does not say",
            "first_seen_step": "BIGINT -- first checkpoint step that trained on the sequence (NULL: never / unknown)",
            "sup_seq": "DOUBLE -- mean surprisal −log p(x_{i+1} | x_≤i), nats per predicted token",
            "acc_seq": "DOUBLE -- share of predicted tokens whose true id is the top-1 prediction (rank 0)",
            "avg_rank": "DOUBLE -- mean rank of the true token: #{v : logit_v > logit_true}, 0 = top-1",
            "entr_seq": "DOUBLE -- mean entropy of the predictive distribution, nats",
            "tokens": "BIGINT -- predicted positions averaged over (sequence length − 1)",
        },
        key=("sequence_id",),
        doc="Per corpus sequence and step: the outcomes of Lesci et al.'s memorisation profiles.",
    ),)

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        self._corpus: Corpus | None = None
        self._seqs: Sequences | None = None  # long enough, sorted by length (so padded_batches keeps this order)
        self._skipped = 0

    def analyze(self, ctx: AnalysisContext) -> RunRows:
        model = load_model(ctx.checkpoint, ctx.device)
        if model.kind != CAUSAL:
            out = self.new_rows(model.dtype_label, backend(ctx.device))
            out.anomalies.append((None, "not_applicable", f"sequence_stats needs a causal LM; {ctx.checkpoint.path.name} is a masked LM"))
            return out
        seqs = self._prepare(ctx, model)
        out = self.new_rows(model.dtype_label, backend(ctx.device), sequences=len(seqs), skipped_short=self._skipped)
        if self._skipped:
            out.anomalies.append((None, "short_sequences", f"{self._skipped} corpus sequence(s) with fewer than 2 tokens "
                                  "have nothing to predict and were skipped"))
        size = self.options.batch_size
        ctx.progress.start(-(-len(seqs) // size))
        sums = np.zeros((len(seqs), 4))  # Σ sup, #top-1, Σ rank, Σ entropy per sequence
        for start in range(0, len(seqs), size):
            ((ids, mask),) = padded_batches(seqs.tokens[start : start + size], size)
            sums[start : start + len(ids)] = self._batch(model, ids, mask)
            ctx.progress.advance()
        counts = np.array([len(t) - 1 for t in seqs.tokens], dtype=np.float64)
        means = sums / counts[:, None]
        out.tables["sequence_stats"] = {
            "sequence_id": list(seqs.ids), "split": list(seqs.split), "first_seen_step": list(seqs.first_seen_step),
            "sup_seq": means[:, 0].tolist(), "acc_seq": means[:, 1].tolist(), "avg_rank": means[:, 2].tolist(),
            "entr_seq": means[:, 3].tolist(), "tokens": counts.astype(np.int64).tolist(),
        }
        return out

    def _prepare(self, ctx: AnalysisContext, model: LoadedModel) -> Sequences:
        """The corpus (parsed once per run) as sequences with something to predict, checked against this model."""
        if self._seqs is None:
            self._corpus = self._corpus or load_corpus(self.options.corpus, "corpus")
            seqs, self._skipped = require_length(self._corpus.sequences(tokenizer_dirs(ctx)), 2, self._corpus.path)
            self._seqs = seqs.subset(sorted(range(len(seqs)), key=lambda i: len(seqs.tokens[i])))  # shortest first: less padding
        check_vocab(self._seqs, model.vocab_size, self.options.corpus)
        longest = max(len(t) for t in self._seqs.tokens) - 1  # inputs: every token but the last
        if model.max_positions() and longest > model.max_positions():
            raise CkptscopeError(f"{self.options.corpus}: a sequence of {longest + 1} tokens needs {longest} input positions; "
                                 f"the model has {model.max_positions()} (Pythia: 2049-token sequences, 2048 positions)")
        return self._seqs

    @torch.no_grad()
    def _batch(self, model: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """(Σ sup, #rank 0, Σ rank, Σ entropy) of each right-padded sequence in one forward pass."""
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model.module(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits
        targets = ids[:, 1:]
        lengths = mask[:, 1:].sum(1).tolist()  # predicted positions of each row: its length − 1
        out = torch.zeros(len(ids), 4, dtype=torch.float64, device=logits.device)
        for row, n in enumerate(lengths):
            for lo in range(0, n, POSITIONS_PER_CHUNK):  # bounded temporaries, whatever the vocabulary
                z = logits[row, lo : min(n, lo + POSITIONS_PER_CHUNK)]
                true = targets[row, lo : lo + len(z), None]
                # Ranks compare logits in the model's own dtype: the log-softmax shift is common to every
                # entry, and comparing before it avoids ties that rounding the shifted values would create.
                rank = (z > z.gather(1, true)).sum(1)
                # The rest in the logits' dtype, at least float32, relative to each row's maximum (so the
                # entropy's two terms stay small); the per-sequence sums accumulate in float64.
                shifted = z.to(torch.promote_types(z.dtype, torch.float32))
                shifted = shifted - shifted.max(1, keepdim=True).values
                e = shifted.exp()
                total = e.sum(1, keepdim=True)
                lse = total.log()[:, 0]  # log Σ exp(shifted): ℓ = shifted − lse
                entropy = lse - (e * shifted).sum(1) / total[:, 0]
                sup = lse - shifted.gather(1, true)[:, 0]
                out[row] += torch.stack([sup.sum(dtype=torch.float64), (rank == 0).sum().double(), rank.sum().double(),
                                         entropy.sum(dtype=torch.float64)])
        return out.cpu().numpy()
