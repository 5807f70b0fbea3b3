"""Evaluate one candidate of a search: merge its recipe, score the merged model, drop it.

A candidate merge runs through fusekit's own planner, executor and operators; only the sink
differs: :class:`~fusekit.io.memory_writer.MemoryWriter` keeps the merged tensors in memory (the
exact bytes ``fusekit merge`` would write), and they are loaded into one transformers model that is
built once per process and reused for every candidate. A merge too large for ``max_memory`` goes
through a temporary folder instead (``fusekit merge``, then ``fusekit score``'s loader), deleted
after. The score is bits per byte on the ``tune: data`` texts, measured by
:func:`fusekit.lm.score.score_texts` exactly as ``fusekit score`` measures it (texts summed: total
negative log-likelihood over total bytes).

Nothing here imports torch or transformers at module level: recipe validation may import it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusekit.errors import FusekitError, NonFiniteError

if TYPE_CHECKING:
    import torch

    from fusekit.lm.load import LoadedLM
    from fusekit.lm.score import TextScore
    from fusekit.plan import Plan
    from fusekit.recipe import MergeRecipe
    from fusekit.tune.spec import TuneSpec

MEMORY_FRACTION = 0.5
"""Share of the memory available when an :class:`Evaluator` starts that in-memory merges may use
when no ``max_memory`` is given."""


@dataclass(frozen=True)
class Evaluation:
    """What one candidate scored.

    Attributes:
        key: :func:`recipe_key` of the candidate's recipe (the cache key).
        score: bits per byte on ``tune: data`` (lower is better; ``inf`` when the merge holds NaN/Inf).
        test_score: bits per byte on ``tune: test`` when asked for, else None (never optimised).
        seconds: wall time of the merge and scoring (a cached answer repeats the first one's).
        worker: ``hostname:pid`` of the process that computed it.
    """

    key: str
    score: float
    test_score: float | None
    seconds: float
    worker: str


def recipe_key(recipe: dict[str, Any]) -> str:
    """A digest of ``recipe`` that ignores key order: equal recipes, equal keys (the digest
    :meth:`fusekit.tune.space.SearchSpace.key` gives a point's recipe).

    Example:
        >>> recipe_key({"a": 1, "b": [2]}) == recipe_key({"b": [2], "a": 1})
        True
    """
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def worker_name() -> str:
    """``hostname:pid`` of this process (where an evaluation ran)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """The texts of ``tune: data`` / ``test`` files: every row's text of a ``.jsonl`` file (read as
    router data is: ``text``, or the ``completion`` after a ``prompt``), a plain file whole (read
    as ``fusekit score --text`` reads it).

    Raises:
        FusekitError: a file is missing, unreadable, empty or malformed (one line naming it).
    """
    from fusekit.select.data import read_data_texts

    return [text for path in paths for text in read_data_texts(path, completions=True, option=None)]


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``; total memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_candidate(recipe: dict[str, Any], name: str) -> tuple[MergeRecipe, str]:
    """A candidate's recipe dict, validated as a merge recipe file would be, and its YAML text."""
    import yaml

    from fusekit.recipe import parse_merge_recipe

    text = yaml.safe_dump(recipe, sort_keys=False)
    return parse_merge_recipe(text, name)[0], text


def candidate_seed(recipe: MergeRecipe, fallback: int) -> int:
    """The seed a stochastic candidate merges with: its ``random_seed``, else ``fallback`` (the
    search's seed); 0 for a deterministic method, as :func:`fusekit.merging.pick_seed` gives."""
    from fusekit.merging import pick_seed
    from fusekit.ops import get_method

    stochastic = get_method(recipe.merge_method).stochastic
    return pick_seed(recipe.random_seed if recipe.random_seed is not None else fallback,
                     stochastic=stochastic)


def merge_in_memory(plan: Plan, *, seed: int, device: str = "cpu",
                    max_memory: int | None = None) -> dict[str, torch.Tensor]:
    """Run ``plan`` with fusekit's executor into memory: output name → tensor (CPU, output dtype).

    The tensors are byte for byte what ``fusekit merge`` writes for the same plan and seed.

    Example:
        >>> state = merge_in_memory(fusekit.plan_merge("configs/linear.yaml"), seed=0)  # doctest: +SKIP
    """
    from fusekit.device import resolve_device
    from fusekit.io.memory_writer import MemoryWriter
    from fusekit.plan import Executor

    sinks: list[MemoryWriter] = []

    def sink(folder: Path, specs: Any, **options: Any) -> MemoryWriter:
        sinks.append(MemoryWriter(folder, specs))
        return sinks[-1]

    executor = Executor(plan, device=resolve_device(device), max_shard_bytes=None, seed=seed,
                        max_memory=max_memory, sink=sink)
    executor.run(Path(tempfile.gettempdir()))  # the memory sink writes no file there
    return sinks[0].tensors


def total_score(scores: Sequence[TextScore]) -> float:
    """Bits per byte of several texts together (NLL summed over bytes summed); ``inf`` for NaN."""
    nll = sum(s.nll_nats for s in scores)
    n_bytes = sum(s.n_bytes for s in scores)
    value = nll / math.log(2) / n_bytes if n_bytes else math.nan
    return value if math.isfinite(value) else math.inf


class Evaluator:
    """Scores candidate recipes of one search; picklable (Ray ships it to worker processes).

    It holds paths and settings only; the texts, the reusable transformers model and the cache
    are made in the process that evaluates, on first use.

    Args:
        spec: the search (its ``settings.data``/``test`` and ``seed`` are used here).
        device: where merges and scoring run (``cpu``, ``cuda``, ``auto``).
        max_memory: bytes an in-memory candidate may use (merge, weights and model); larger
            candidates go through a temporary folder. Default: half the memory available.
        work_dir: where temporary folders go (default: the system's temp folder).
        with_test: also score ``settings.test``.

    Example:
        >>> evaluator = Evaluator(load_tune_spec("tune.yaml"))  # doctest: +SKIP
        >>> evaluator(spec.space.recipe_for(spec.space.default_point())).score  # doctest: +SKIP
    """

    def __init__(self, spec: TuneSpec, *, device: str = "cpu", max_memory: int | None = None,
                 work_dir: Path | None = None, with_test: bool = False) -> None:
        self.spec = spec
        self.device = device
        self.max_memory = max_memory
        self.work_dir = work_dir
        self.with_test = with_test
        self.cache: dict[str, Evaluation] = {}
        self.computed = 0  # candidates merged and scored by this process (not cache hits)
        self._live: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_live"] = {}  # texts and the loaded model are rebuilt where the evaluator lands
        return state

    def __call__(self, recipe: dict[str, Any]) -> Evaluation:
        """Merge ``recipe`` (a plain merge recipe dict) and score it; a repeated recipe comes from
        the cache.

        Raises:
            FusekitError: the recipe, a model, or a data file is at fault (one line).
        """
        key = recipe_key(recipe)
        found = self.cache.get(key)
        if found is not None:
            return found
        started = time.perf_counter()
        try:
            scores = self.score_recipe(recipe)
        except NonFiniteError:
            scores = (math.inf, math.inf if self.with_test else None)
        self.computed += 1
        evaluation = Evaluation(key, scores[0], scores[1], time.perf_counter() - started, worker_name())
        self.cache[key] = evaluation
        return evaluation

    def score_recipe(self, recipe: dict[str, Any]) -> tuple[float, float | None]:
        """Bits per byte of ``recipe``'s merge on the data (and the test texts when asked)."""
        from fusekit.plan import build_plan

        parsed, text = parse_candidate(recipe, self.spec.path.name)
        plan = build_plan(parsed, recipe_text=text)
        seed = candidate_seed(parsed, self.spec.settings.seed)
        if self.fits_in_memory(plan):
            return self._score(self.load_in_memory(plan, seed))
        return self._score_through_folder(parsed, seed)

    def memory_budget(self) -> int:
        """``max_memory``, or :data:`MEMORY_FRACTION` of the memory available now."""
        if self.max_memory is not None:
            return self.max_memory
        if "budget" not in self._live:
            self._live["budget"] = int(available_memory() * MEMORY_FRACTION)
        return int(self._live["budget"])

    def fits_in_memory(self, plan: Plan) -> bool:
        """Whether merging ``plan`` in memory stays within :meth:`memory_budget`: the merge's own
        working memory, the merged tensors, and the float32 model they are loaded into."""
        from fusekit.plan.memory import memory_estimate

        if plan.vocab is not None:  # its tokenizer is written with the output: use a folder
            return False
        budget = self.memory_budget()
        peak, _, _ = memory_estimate(plan, budget)
        numel = sum(task.numel for task in plan.tasks)
        return peak + plan.graph.output_bytes + 4 * numel <= budget

    def load_in_memory(self, plan: Plan, seed: int) -> LoadedLM:
        """The candidate merged in memory and loaded into the reused transformers model."""
        state = merge_in_memory(plan, seed=seed, device=self.device, max_memory=self.memory_budget())
        lm = self.model_for(plan)
        missing, unexpected = lm.model.load_state_dict(state, strict=False)
        tied = {name for name in missing if _is_tied(lm.model, name)}
        if unexpected or set(missing) - tied:
            raise FusekitError(f"the merged tensors do not fit {type(lm.model).__name__}: missing "
                               f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
        return lm

    def model_for(self, plan: Plan) -> LoadedLM:
        """One float32 transformers model per output config (built once, weights replaced per
        candidate) with the tokenizer of the plan's tokenizer source."""
        from fusekit.device import resolve_device
        from fusekit.lm.load import LoadedLM, import_transformers, load_tokenizer

        config_key = "model:" + json.dumps(plan.out_config, sort_keys=True, default=str)
        if config_key not in self._live:
            transformers = import_transformers()
            import torch

            config = transformers.AutoConfig.for_model(**plan.out_config)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.to(resolve_device(self.device)).eval()
            source = plan.tokenizer_source or plan.models[plan.donor]
            tokenizer = load_tokenizer(plan.donor, source.folder)
            self._live[config_key] = LoadedLM(f"candidate of {self.spec.path.name}",
                                              plan.models[plan.donor], model, tokenizer,
                                              resolve_device(self.device))
        lm: LoadedLM = self._live[config_key]
        return lm

    def _score_through_folder(self, parsed: MergeRecipe, seed: int) -> tuple[float, float | None]:
        """Merge into a temporary folder under ``work_dir``, score it as ``fusekit score`` would,
        delete it."""
        from fusekit.lm.load import load_lm
        from fusekit.merging import merge

        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fusekit-candidate-", dir=self.work_dir) as temp:
            out = Path(temp) / "merged"
            merge(parsed, out, device=self.device, random_seed=seed, out_shard_size=None,
                  max_memory=self.memory_budget())
            return self._score(load_lm(out, device=self.device))

    def texts(self) -> tuple[list[str], list[str]]:
        """The data and test texts, read once per process."""
        if "texts" not in self._live:
            settings = self.spec.settings
            self._live["texts"] = (read_texts(settings.data),
                                   read_texts(settings.test) if self.with_test else [])
        texts: tuple[list[str], list[str]] = self._live["texts"]
        return texts

    def _score(self, lm: LoadedLM) -> tuple[float, float | None]:
        from fusekit.lm.score import score_texts

        data, test = self.texts()
        score = total_score(score_texts(lm, data, desc="scoring a candidate"))
        test_score = total_score(score_texts(lm, test, desc="scoring a candidate on test")) if test else None
        return score, test_score


def _is_tied(model: Any, name: str) -> bool:
    """Whether parameter ``name`` of ``model`` shares its storage with another (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(other is target for key, other in params.items() if key != name)
