"""Catalog of public intermediate-checkpoint suites on the Hugging Face Hub.

An entry knows how a suite *names* its checkpoints (which repos, which revision names, how a
name maps to a training step and to tokens seen, the step grid the authors published) and
nothing about what exists today: branches get deleted, re-uploaded and added, so the Hub is
always listed at run time and the catalog only interprets the listing.

Suites publish checkpoints in two ways:
- one repo, one git branch (or tag) per checkpoint (`Suite.repo`), e.g. Pythia's `step1000`;
- one repo per checkpoint (`Suite.repo_template`), e.g. MultiBERTs' `…-step_20k` repos, whose
  checkpoint lives on `main`.

A revision pattern is a regex matched against the whole revision name (`re.fullmatch`). The
step is its group `step` (or its first group); an optional group `tokens` counts billions of
tokens, the way OLMo names branches (`step1000-tokens4B`). Revisions that do not match
(`main`, OLMo 2's `stage2-…` soup ingredients) are not checkpoints of the suite.

Any other `ORG/NAME` gets a generic entry whose default rule is: the step is the number in a
`step…`/`checkpoint-…`/`global_step…`/`ckpt_…`/`iter_…` token of the name (the rule local runs
use, `ckptscope.sources.local.step_from_name`), or the whole name when it is a bare number
(`0000020000`); tokens come from a `tokens{M}B` token when present.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace
from functools import cached_property

from ckptscope.errors import SourceError
from ckptscope.sources.local import step_from_name

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
TOKENS_IN_NAME = re.compile(r"(?:^|[-_])tokens(\d+)B(?:$|[-_])")
PREFERRED_FORMATS = ("safetensors", "bin")  # safetensors reads one tensor at a time, without unpickling


@dataclass(frozen=True)
class Suite:
    """How one model's checkpoints are named on the Hub."""

    name: str  # catalog name, e.g. "pythia-160m"; a generic entry uses the repo's NAME
    family: str  # groups members for `ckptscope suites FAMILY`; "hub" for generic entries
    repo: str | None = None  # one repo whose branches/tags are the checkpoints
    repo_template: str | None = None  # one repo per checkpoint: template.format(step // repo_step_unit)
    repo_step_unit: int = 1
    revision_pattern: str | None = None  # None: the generic default rule (module docstring)
    tokens_per_step: int | None = None
    steps: tuple[int, ...] | None = None  # the grid the authors published, when known
    revision_template: str | None = None  # step N's revision is template.format(N), when the naming is that plain
    prefer: tuple[str, ...] = PREFERRED_FORMATS
    notes: str = ""
    group: str | None = None  # seed replicates share a group (`models.group_name`); None: not part of one
    seed: int | None = None  # this member's seed within `group`

    def __post_init__(self) -> None:
        if (self.repo is None) == (self.repo_template is None):
            raise ValueError(f"suite {self.name}: give exactly one of repo and repo_template")
        if self.repo_template is not None and self.steps is None:
            raise ValueError(f"suite {self.name}: a repo-per-checkpoint suite needs its step grid to find its repos")

    @property
    def per_step_repos(self) -> bool:
        return self.repo_template is not None

    @property
    def repo_glob(self) -> str:
        """The repo, or the template's shape with `*` for the step, for display and source ids."""
        return self.repo if self.repo is not None else self.repo_template.replace("{}", "*")

    def repo_for(self, step: int) -> str:
        """The repo that holds `step`."""
        if self.repo is not None:
            return self.repo
        return self.repo_template.format(step // self.repo_step_unit)

    @cached_property
    def _pattern(self) -> re.Pattern[str] | None:
        return compile_revision_pattern(self.revision_pattern) if self.revision_pattern is not None else None

    @cached_property
    def _repo_pattern(self) -> re.Pattern[str] | None:
        if self.repo_template is None:
            return None
        return re.compile(re.escape(self.repo_template).replace(re.escape("{}"), r"(?P<step>\d+)"))

    def step_of(self, revision: str) -> int | None:
        """The step a revision name stands for, or None when it is not a checkpoint of this suite.

        For repo-per-checkpoint suites the name is `ORG/NAME@BRANCH` and the step comes from NAME.
        """
        if self._repo_pattern is not None:
            repo, _, branch = revision.partition("@")
            match = self._repo_pattern.fullmatch(repo)
            if not match or branch not in ("", "main"):
                return None
            return int(match.group("step")) * self.repo_step_unit
        if self._pattern is None:
            step = step_from_name(revision)
            if step is None and revision.isdigit():
                step = int(revision)
            return step
        match = self._pattern.fullmatch(revision)
        if not match:
            return None
        return int(match.group("step") if "step" in match.re.groupindex else match.group(1))

    def download_command(self, step: int) -> str:
        """The `hf download` command that puts `step` in the HF cache, for messages offline."""
        if self.repo_template is not None:
            return f"hf download {self.repo_for(step)}"
        revision = self.revision_template.format(step) if self.revision_template else f"<revision of step {step}>"
        return f"hf download {self.repo} --revision {revision}"

    def tokens(self, step: int, revision: str) -> int | None:
        """Tokens seen at `step`: from the revision name when it says so, else from tokens per step."""
        if self._pattern is not None and "tokens" in self._pattern.groupindex:
            match = self._pattern.fullmatch(revision)
            if match and match.group("tokens") is not None:
                return int(match.group("tokens")) * 10**9
        elif self._pattern is None and self.repo_template is None:
            match = TOKENS_IN_NAME.search(revision)
            if match:
                return int(match.group(1)) * 10**9
        return step * self.tokens_per_step if self.tokens_per_step else None

    def naming(self) -> str:
        """How a checkpoint is addressed, in words, for `ckptscope suites`."""
        if self.repo_template is not None:
            unit = f" (step / {self.repo_step_unit})" if self.repo_step_unit != 1 else ""
            return f"one repo per checkpoint: {self.repo_glob}{unit}, branch main"
        rule = self.revision_pattern if self.revision_pattern is not None else "default rule (step…, checkpoint-…, ckpt_…, bare numbers)"
        return f"revisions of {self.repo} matching {rule}"

    def grid_text(self) -> str:
        """The published step grid, compressed into runs, e.g. `0, 1, 2, 4, …, 512, then every 1000 from 1000 to 143000`."""
        if not self.steps:
            return "not published; listed at run time"
        return f"{len(self.steps)} steps: {compress_steps(list(self.steps))}"


def compile_revision_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a user or catalog revision pattern; it must capture the step."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SourceError(f"bad --revision-pattern {pattern!r}: {exc}; give a regex like 'step(\\d+)'") from None
    if "step" not in regex.groupindex and regex.groups < 1:
        raise SourceError(f"--revision-pattern {pattern!r} captures no step; use a group, e.g. 'step(\\d+)' or '(?P<step>\\d+)'")
    return regex


def compress_steps(steps: list[int]) -> str:
    """Sorted steps with runs of 4+ equally spaced steps as `every D from A to B`; everything else listed."""
    parts: list[str] = []
    i = 0
    while i < len(steps):
        j = i + 1
        if j < len(steps):
            gap = steps[j] - steps[i]
            while j + 1 < len(steps) and steps[j + 1] - steps[j] == gap:
                j += 1
        if j - i + 1 >= 4:
            parts.append(f"every {gap} from {steps[i]} to {steps[j]}")
            i = j + 1
        else:
            parts.append(str(steps[i]))
            i += 1
    return ", ".join(parts)


def _build() -> dict[str, Suite]:
    suites: list[Suite] = []
    pythia_grid = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, *range(1000, 143001, 1000))
    pythia = dict(revision_pattern=r"step(?P<step>\d+)", revision_template="step{}", tokens_per_step=2_097_152, steps=pythia_grid)
    poly_sizes = ("14m", "31m", "70m", "160m", "410m")
    for size in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"):
        for suffix in ("", "-deduped"):
            # The original standard-Pile models are PolyPythias' seed 1234 (Pythia paper, "Multiple random seeds").
            seeded = dict(group=f"polypythia-{size}", seed=1234) if size in poly_sizes and not suffix else {}
            suites.append(Suite(f"pythia-{size}{suffix}", "pythia", repo=f"EleutherAI/pythia-{size}{suffix}",
                                notes="step branches hold pytorch_model*.bin only; main (= step143000) is not a step",
                                **pythia, **seeded))
    # PolyPythias: seed N changes both init and data order; the 160m data-/weight-seed runs vary one of them,
    # so they form groups of their own (without seed 1234, which varies both).
    poly = [(f"pythia-{size}-seed{seed}", f"polypythia-{size}", seed) for size in poly_sizes for seed in range(1, 10)]
    poly += [(f"pythia-160m-{kind}-seed{seed}", f"polypythia-160m-{kind}", seed) for kind in ("data", "weight") for seed in (1, 2, 3)]
    suites += [Suite(n, "polypythia", repo=f"EleutherAI/{n}", notes="main is empty; use step branches", group=g, seed=k, **pythia)
               for n, g, k in poly]

    olmo = r"step(?P<step>\d+)-tokens(?P<tokens>\d+)B"
    for n in ("OLMo-1B-hf", "OLMo-7B-hf", "OLMo-7B-0424-hf", "OLMo-1B-0724-hf"):
        suites.append(Suite(n, "olmo", repo=f"allenai/{n}", revision_pattern=olmo, notes="about every 1000 steps, with gaps"))
    olmo2 = r"(?:stage1-)?step(?P<step>\d+)-tokens(?P<tokens>\d+)B"
    for n in ("OLMo-2-0425-1B", "OLMo-2-0425-1B-early-training", "OLMo-2-1124-7B", "OLMo-2-1124-13B", "OLMo-2-0325-32B"):
        suites.append(Suite(n, "olmo-2", repo=f"allenai/{n}", revision_pattern=olmo2,
                            notes="stage 1 only; a stage-2 soup ingredient is its own trajectory: "
                                  "--revision-pattern 'stage2-ingredient1-step(?P<step>\\d+)-tokens(?P<tokens>\\d+)B'"))

    multiberts_grid = tuple(k * 1000 for k in (0, *range(20, 201, 20), *range(300, 2001, 100)))
    for seed in range(5):
        suites.append(Suite(f"multiberts-seed_{seed}", "multiberts", repo_template=f"google/multiberts-seed_{seed}-step_{{}}k",
                            repo_step_unit=1000, steps=multiberts_grid, notes="pytorch_model.bin + tf_model.h5; only the .bin is fetched",
                            group="multiberts", seed=seed))

    suites.append(Suite("Amber", "amber", repo="LLM360/Amber", revision_pattern=r"ckpt_(?P<step>\d+)", steps=tuple(range(360)),
                        notes="the step is the checkpoint index (one per data chunk); sharded fp32 .bin, ~27 GB each"))

    crfm_grid = (*range(0, 100, 10), *range(100, 2000, 50), *range(2000, 20000, 100), *range(20000, 400001, 1000))
    for n in ("alias-gpt2-small-x21", "battlestar-gpt2-small-x49", "caprica-gpt2-small-x81", "darkmatter-gpt2-small-x343",
              "expanse-gpt2-small-x777", "arwen-gpt2-medium-x21", "beren-gpt2-medium-x49", "celebrimbor-gpt2-medium-x81",
              "durin-gpt2-medium-x343", "eowyn-gpt2-medium-x777"):
        size, seed = re.fullmatch(r"\w+-gpt2-(small|medium)-x(\d+)", n).groups()  # xNN is the replicate's seed
        suites.append(Suite(n, "crfm-gpt2", repo=f"stanford-crfm/{n}", revision_pattern=r"checkpoint-(?P<step>\d+)", steps=crfm_grid,
                            notes="main also holds DeepSpeed states; only config + weights are fetched",
                            group=f"crfm-gpt2-{size}", seed=int(seed)))

    for size, tps in (("135M", 1_048_576), ("360M", None), ("1.7B", None)):
        n = f"SmolLM2-{size}-intermediate-checkpoints"
        suites.append(Suite(n, "smollm2", repo=f"HuggingFaceTB/{n}", revision_pattern=r"step-(?P<step>\d+)", tokens_per_step=tps,
                            notes="main holds only a README"))
    return {s.name.lower(): s for s in suites}


CATALOG: dict[str, Suite] = _build()
_BY_REPO: dict[str, Suite] = {s.repo.lower(): s for s in CATALOG.values() if s.repo is not None}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(s.family for s in CATALOG.values()))


def seed_groups() -> dict[str, list[Suite]]:
    """Catalog members that are seed replicates of one another, by group name, in seed order."""
    groups: dict[str, list[Suite]] = {}
    for s in CATALOG.values():
        if s.group is not None:
            groups.setdefault(s.group, []).append(s)
    return {g: sorted(members, key=lambda s: s.seed) for g, members in groups.items()}


def list_suites(family: str | None = None) -> list[Suite]:
    """Every catalog entry (of one family), in catalog order."""
    return [s for s in CATALOG.values() if family is None or s.family == family.lower()]


def describe(name: str) -> list[Suite]:
    """The members of a family (`pythia`), or the one suite a name or repo id resolves to."""
    if name.lower() in FAMILIES:
        return list_suites(name)
    return [resolve(name)]


def resolve(name: str, *, revision_pattern: str | None = None) -> Suite:
    """The catalog entry for a suite name or repo id; any other `ORG/NAME` gets a generic entry.

    `revision_pattern` replaces the entry's naming rule. Unknown bare names raise SourceError
    naming the closest catalog entries.
    """
    key = name.strip().lower()
    suite = CATALOG.get(key) or _BY_REPO.get(key)
    if suite is None and "/" in key:
        if not REPO_ID.fullmatch(name.strip()):
            raise SourceError(f"{name!r} is not a hub repo id; give ORG/NAME, e.g. EleutherAI/pythia-160m")
        org_name = name.strip()
        suite = Suite(org_name.split("/")[1], "hub", repo=org_name)
    if suite is None:
        if key in FAMILIES:
            members = ", ".join(s.name for s in list_suites(key)[:4])
            raise SourceError(f"{name!r} is a family of suites; name one member, e.g. {members} (see `ckptscope suites {key}`)")
        raise SourceError(f"unknown suite {name!r}; {suggest(name)}")
    if revision_pattern is not None:
        compile_revision_pattern(revision_pattern)
        suite = replace(suite, revision_pattern=revision_pattern, revision_template=None)
    return suite


def suggest(name: str) -> str:
    """'closest catalog names: …' for an unknown suite or repo, plus how to name any repo."""
    tail = name.strip().split("/")[-1].lower()
    names = {s.name.lower(): s.name for s in CATALOG.values()}
    close = [names[n] for n in difflib.get_close_matches(tail, names, n=3, cutoff=0.6)]
    hint = f"closest catalog names: {', '.join(close)}" if close else "see `ckptscope suites` for the catalog"
    return f"{hint}; any other hub repo is named ORG/NAME"
