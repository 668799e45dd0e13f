"""The straight pipeline: `plan` (what to do) → `tasks` (one step's work) → `executors` (where it
runs) → `ingest` (the driver that writes each result to the store)."""

from ckptscope.pipeline.ingest import analyze, ingest

__all__ = ["analyze", "ingest"]
