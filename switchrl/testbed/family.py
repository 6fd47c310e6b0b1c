"""Build (or reuse) the testbed family and describe it: checkpoints, candidates, tasks, scorers."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from switchrl.config import CandidateConfig, SwitchGenerationConfig
from switchrl.errors import CheckpointError
from switchrl.rewards.base import Scorer
from switchrl.tasks.base import TaskInstance
from switchrl.testbed import finetune, stages
from switchrl.testbed.corpus import PROMPT_TEMPLATE
from switchrl.testbed.provenance import provenance
from switchrl.testbed.shipped import shipped_root
from switchrl.testbed.tasks import make_scorer, make_tasks
from switchrl.testbed.tokenizer import LABEL_TOKENS, build_tokenizer
from switchrl.testbed.world import World
from switchrl.utils.threads import torch_threads

STAGES = ("pretrained", "finetuned", "aligned")
MARKER = "testbed.json"
FORMAT_VERSION = 1
PATCH_TOKENS = 3
"""Tokens per patch: each fact of the answer format ends in a 3-token patch (``is 8 .``) that the
pretrained model writes alone, and the sum is ``8 + 5`` then ``= 13 .``. Longer patches mix a fact
with format tokens and the reference-patch oracle collapses (probe: 95% at 3, 45% at 4)."""
MAX_NEW_TOKENS = 32
EOS_AFTER = r"answer is \d+ \."
"""EOS rule applied to every candidate alike: a response may end only after ``answer is N .``."""


def cache_root() -> Path:
    """``$SWITCHRL_CACHE``, default ``~/.cache/switchrl``: where built checkpoints are kept."""
    cache = (
        Path(os.environ["SWITCHRL_CACHE"])
        if os.environ.get("SWITCHRL_CACHE")
        else Path.home() / ".cache" / "switchrl"
    )
    return cache.expanduser()


def default_root(seed: int) -> Path:
    """``$SWITCHRL_CACHE/testbed/<seed>`` (default cache root: ``~/.cache/switchrl``)."""
    return cache_root() / "testbed" / str(seed)


@dataclass
class TestbedFamily:
    """A built testbed: three checkpoints of one pipeline plus the world they were trained on."""

    root: Path
    seed: int
    build_seconds: dict[str, float] = field(default_factory=dict)
    label_tokens: list[str] = field(default_factory=lambda: list(LABEL_TOKENS))
    provenance: dict = field(default_factory=dict)
    """Where and with what it was built (:func:`~switchrl.testbed.provenance.provenance`); empty for
    families built before switchrl recorded it."""
    stage_info: dict[str, dict] = field(default_factory=dict)
    """What each stage recorded (pretraining: steps taken and fact-patch recall per check)."""

    __test__ = False  # not a pytest test class

    @property
    def pretrained(self) -> Path:
        return self.root / "pretrained"

    @property
    def finetuned(self) -> Path:
        return self.root / "finetuned"

    @property
    def aligned(self) -> Path:
        return self.root / "aligned"

    @property
    def paths(self) -> dict[str, Path]:
        return {name: self.root / name for name in STAGES}

    @property
    def world(self) -> World:
        return World(self.seed)

    @classmethod
    def load(cls, root: str | Path) -> TestbedFamily:
        """Open a complete family; raises :class:`CheckpointError` when ``root`` holds none."""
        root = Path(root).expanduser()
        marker = root / MARKER
        if not marker.is_file():
            raise CheckpointError(
                f"no complete testbed family at {root} (missing {MARKER}); "
                "build one with `switchrl testbed build`"
            )
        info = json.loads(marker.read_text())
        if info.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"testbed family at {root} has format version {info.get('format_version')}, "
                f"this switchrl expects {FORMAT_VERSION}; rebuild it with --force"
            )
        missing = [n for n in STAGES if not (root / n / "config.json").is_file()]
        if missing:
            raise CheckpointError(f"testbed family at {root} lacks checkpoints {missing}")
        return cls(
            root=root,
            seed=int(info["seed"]),
            build_seconds=info.get("build_seconds", {}),
            label_tokens=list(info.get("label_tokens", LABEL_TOKENS)),
            provenance=info.get("provenance", {}),
            stage_info=info.get("stages", {}),
        )

    def candidate_configs(self, temperature: float = 0.0, top_p: float = 1.0) -> list[CandidateConfig]:
        """The three checkpoints as candidates, sharing one prompt template and one EOS rule."""
        return [
            CandidateConfig(
                name=name,
                path=str(path),
                temperature=temperature,
                top_p=top_p,
                prompt_template=PROMPT_TEMPLATE,
                eos_after=EOS_AFTER,
                dtype="float32",
            )
            for name, path in self.paths.items()
        ]

    def generation_config(self) -> SwitchGenerationConfig:
        return SwitchGenerationConfig(
            patch_tokens=PATCH_TOKENS, max_new_tokens=MAX_NEW_TOKENS, seed=self.seed
        )

    def tasks(self, task: str, split: str) -> list[TaskInstance]:
        return make_tasks(self.world, task, split)

    def scorer(self, task: str, partial: bool = False) -> Scorer:
        return make_scorer(task, partial)


def _jsonable(value):
    """``value`` as it reads back from JSON (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def existing_root(seed: int, out: str | Path | None = None) -> Path | None:
    """Where :func:`build_family` finds the family of ``seed`` without training one: a complete family in
    ``out`` (default: the cache), else, with ``out`` unset, the family shipped for ``seed``; ``None``
    when it would have to build."""
    root = Path(out).expanduser() if out is not None else default_root(seed)
    if (root / MARKER).is_file():
        return root
    return shipped_root(seed) if out is None else None


def build_family(
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    force: bool = False,
    settings: stages.StageConfig | None = None,
    use_shipped: bool = True,
    workers: int | None = None,
) -> TestbedFamily:
    """Train the pretrained -> finetuned -> aligned family for world ``seed`` (or reuse a complete one).

    A complete family in ``out`` (default: the cache, :func:`default_root`) is reused. Otherwise, when
    ``seed`` has a family shipped with the package (:mod:`~switchrl.testbed.shipped`) and neither
    ``out``, ``settings`` nor ``force`` asks for a build, that one is used (``use_shipped=False``
    builds locally instead). Stages already present in ``out`` are reused (each is written
    atomically); the marker file is written last, so an interrupted build resumes at the missing
    stage. ``force`` rebuilds everything. ``workers``: SFT tries run at once on Ray (None: one per free
    core when Ray is installed, :func:`~switchrl.testbed.finetune.default_workers`); the weights do not
    depend on it.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    root = Path(out).expanduser() if out is not None else default_root(seed)
    if force and root.exists():
        shutil.rmtree(root)
    if (root / MARKER).is_file():
        family = TestbedFamily.load(root)
        if family.seed != seed:
            raise CheckpointError(f"{root} holds the testbed family of seed {family.seed}, not {seed}")
        built = json.loads((root / MARKER).read_text()).get("settings", {})
        wanted = asdict(settings or stages.StageConfig())
        differ = sorted(k for k in wanted.keys() | built.keys() if built.get(k) != _jsonable(wanted.get(k)))
        if differ:
            warnings.warn(
                f"reusing the testbed family at {root}, built with other settings ({', '.join(differ)}) "
                "than this switchrl's recipe; rebuild it with `switchrl testbed build --force`",
                stacklevel=2,
            )
        return family
    # not in ``root``: the one shipped for ``seed`` (the canonical family: the same weights on every machine)
    shipped = existing_root(seed) if use_shipped and out is None and settings is None and not force else None
    if shipped is not None:
        return TestbedFamily.load(shipped)
    settings = settings or stages.StageConfig()
    tries_at_once = finetune.default_workers(settings) if workers is None else workers
    finetune.check_workers(tries_at_once)  # before hours of training, not after
    world = World(seed)
    tokenizer = build_tokenizer(world)
    family = TestbedFamily(root=root, seed=seed)
    seconds: dict[str, float] = {}
    prov = provenance()  # before the stages: the load average says how busy the CPU was at the start
    # One thread whatever the core count: the weights depend on it (20 pretraining steps at 2 threads
    # differ from 1 thread in their sha256), and a rebuild is compared with the shipped family.
    with torch_threads(1):
        prov["torch_threads"] = torch.get_num_threads()
        prov["sft_tries_at_once"] = tries_at_once
        for name, run in (
            ("pretrained", lambda: stages.pretrain(world, tokenizer, family.pretrained, settings, progress)),
            (
                "finetuned",
                lambda: finetune.finetune(
                    world, tokenizer, family.pretrained, family.finetuned, settings, progress, tries_at_once
                ),
            ),
            (
                "aligned",
                lambda: stages.align(world, tokenizer, family.finetuned, family.aligned, settings, progress),
            ),
        ):
            if (root / name / "config.json").is_file():
                continue
            start = time.perf_counter()
            run()
            seconds[name] = round(time.perf_counter() - start, 1)
    prov["load_average_1min_end"] = provenance()["load_average_1min"]
    stage_info = {
        n: json.loads(p.read_text()) for n in STAGES if (p := root / n / stages.STAGE_INFO).is_file()
    }
    info = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "build_seconds": seconds,
        "label_tokens": list(LABEL_TOKENS),
        "patch_tokens": PATCH_TOKENS,
        "settings": asdict(settings),
        "stages": stage_info,
        "provenance": prov,
    }
    tmp = root / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, root / MARKER)
    family.build_seconds, family.provenance, family.stage_info = seconds, prov, stage_info
    return family
