"""Compare ``fusekit merge`` with mergekit 0.1.5, tensor by tensor, on the recipes in configs/parity/.

A developer tool, not part of CI. It INSTALLS mergekit (with pip, from PyPI) into a throwaway
virtual environment outside the repository: torch==2.13.0 first, then mergekit==0.1.5. mergekit is
never a fusekit dependency and is never imported here; only that venv's python runs it.

Steps:
  1. Create the venv, by default WORK/venv-mergekit (``--venv`` to choose), or reuse it when it
     already holds torch 2.13.0 and mergekit 0.1.5. Nothing else needs the network: merges run
     with HF_HUB_OFFLINE=1 on local models.
  2. Build small local Llama models (hidden 64, 4 layers, vocab 300, with a tokenizer) with
     fusekit.demo.build_demo_models under WORK/parity-models/{f32,bf16,tied}/{base,math,code,chat}
     (tied: float32 with tied embeddings, no lm_head), reused on later runs.
  3. For every recipe, run mergekit-yaml (CPU, tokenizer copied) and ``fusekit merge`` on the same
     file, from WORK (recipes name models by paths relative to it), with the same shard size and
     random seed, and compare every output tensor in float64: tensor names, dtypes and shapes, the
     largest |difference|, whether the bytes are equal, and config.json. For stochastic methods
     (dare_*, della*, and arcee_fusion when a tensor has more than 1e6 elements, where mergekit
     samples its quantiles) the random streams differ, so statistics are compared instead: the
     fraction of entries that differ from the base ("kept") and the L2 norm of each output's task
     vector relative to mergekit's; fusekit is also run twice to check the seed reproduces it.
  4. Print a table, write it to WORK/parity.md, and exit 1 when a recipe differs.

Each tool runs from a driver process that imports it once and forks a child per merge, so a merge
starts from the state a fresh ``mergekit-yaml`` / ``fusekit`` process has, without paying the
import (several seconds) every time; ``--fresh-processes`` starts a new driver per merge instead.

A deterministic recipe passes when every tensor satisfies max|fusekit - mergekit| <= rtol *
max|mergekit| (float32 rounding; default rtol 1e-6, about 8 float32 ulps of the largest entry).
For outputs narrower than float32, entries off by exactly one output ulp are rounding flips
caused by float32-level differences upstream; up to --flip-fraction of them are tolerated.
When a TIES or breadcrumbs recipe differs, mergekit is rerun with torch.sort/argsort made stable;
if fusekit then matches, the status is "tie-order": the tools keep different entries among equal
magnitudes at the density cut-off (mergekit's choice follows torch's unstable CPU sort). This
fails the run unless --allow-tie-order. A method fusekit does not know yet gives a "skip" row
("fusekit: unknown method"), not a failure.

Run it with the repository's venv (it imports fusekit):
    .venv/bin/python scripts/parity_mergekit.py [--only 'ties*'] [--keep] [--work DIR]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from fusekit.demo import build_demo_models

REPO = Path(__file__).resolve().parent.parent
TORCH_REQUIREMENT = "torch==2.13.0"
MERGEKIT_REQUIREMENT = "mergekit==0.1.5"
MODEL_NAMES = ("base", "math", "code", "chat")
MODEL_SETS = {  # folder -> (stored dtype, tie_word_embeddings)
    "f32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "tied": (torch.float32, True),  # no lm_head.weight; the embedding doubles as LM head
}
MODELS_DIR = "parity-models"  # recipes write parity-models/<set>/<name>, relative to WORK
STOCHASTIC = frozenset({"dare_linear", "dare_ties", "della", "della_linear"})
ARCEE_SAMPLE_ELEMENTS = 1_000_000  # mergekit's arcee_fusion samples quantiles above this size
# deterministic methods whose result depends on the order torch.sort gives equal magnitudes
TIE_SENSITIVE = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})
SIDE_FILES_IGNORED = frozenset({"README.md", "fusekit.lock"})
_SHARD_SIZE = re.compile(r"^\d+[kKmMbB]?$")  # the sizes both tools read alike


@dataclass(frozen=True)
class Recipe:
    """One recipe file and what the comparison needs from it."""

    name: str
    path: Path
    method: str
    base: str | None


@dataclass
class Row:
    """One line of the report."""

    recipe: str
    method: str
    status: str = "ok"  # ok | DIFF | tie-order | ERROR | skip
    tensors: int | None = None
    max_diff: float | None = None
    bytes_equal: bool | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stochastic: bool = False

    def fail(self, status: str, note: str) -> None:
        if self.status != "ERROR":
            self.status = status
        self.notes.append(note)


@dataclass(frozen=True)
class Settings:
    """Everything a recipe run needs besides the recipe."""

    work: Path
    mergekit_python: Path
    shard_size: str
    seed: int
    rtol: float
    flip_fraction: float
    kept_tol: float
    norm_tol: float
    keep: bool
    known_methods: frozenset[str]
    largest_tensor: int
    fresh_processes: bool


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="parity_mergekit.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Installs mergekit 0.1.5 and torch 2.13.0 from PyPI into a throwaway venv outside "
               "the repository (not a fusekit dependency). Exit status: 0 all recipes match, "
               "1 a recipe differs or a tool failed, 2 setup error.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fusekit-parity"),
                        help="work folder for models, outputs and parity.md (default: %(default)s)")
    parser.add_argument("--venv", type=Path, default=None,
                        help="throwaway venv for mergekit (default: WORK/venv-mergekit); created "
                             "with pip install torch==2.13.0 then mergekit==0.1.5")
    parser.add_argument("--reinstall", action="store_true", help="recreate the venv")
    parser.add_argument("--torch-index-url", default=None,
                        help="pip index for torch, e.g. https://download.pytorch.org/whl/cpu to "
                             "avoid CUDA wheels (default: pip's configuration)")
    parser.add_argument("--recipes", type=Path, default=REPO / "configs" / "parity",
                        help="folder of recipes (default: configs/parity)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only recipes whose file stem matches NAME (a glob; repeatable)")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    parser.add_argument("--keep", action="store_true",
                        help="keep the merged outputs under WORK/out/<recipe>/{mergekit,fusekit}")
    parser.add_argument("--rebuild-models", action="store_true", help="rebuild the input models")
    parser.add_argument("--shard-size", default="5B",
                        help="--out-shard-size for both tools: digits with k/M/B (default: 5B)")
    parser.add_argument("--seed", type=int, default=1234, help="--random-seed for both tools")
    parser.add_argument("--rtol", type=float, default=1e-6,
                        help="deterministic tolerance: max|diff| <= RTOL * max|mergekit| per "
                             "tensor (default: 1e-6, float32 rounding)")
    parser.add_argument("--flip-fraction", type=float, default=1e-3,
                        help="share of entries of a bf16/fp16 tensor that may differ by one "
                             "output ulp (default: 1e-3)")
    parser.add_argument("--kept-tol", type=float, default=0.01,
                        help="stochastic: largest |kept fraction difference| (default: 0.01)")
    parser.add_argument("--norm-tol", type=float, default=0.03,
                        help="stochastic: largest |task-vector norm ratio - 1| (default: 0.03)")
    parser.add_argument("--allow-tie-order", action="store_true",
                        help="do not fail recipes that match mergekit once its sorts break ties "
                             "by index (status tie-order)")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="start new tool processes for every merge instead of forking from "
                             "preloaded ones (slower)")
    parser.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="recipes run at once (default: %(default)s)")
    args = parser.parse_args(argv)
    if not _SHARD_SIZE.match(args.shard_size):
        parser.error(f"--shard-size {args.shard_size!r}: write digits with an optional k, M or B")
    return args


# --- setup --------------------------------------------------------------------------------------


def ensure_venv(venv: Path, *, reinstall: bool, torch_index_url: str | None) -> Path:
    """The venv's python, after installing torch and then mergekit into ``venv`` when needed."""
    python = venv / "bin" / "python"
    if reinstall and venv.exists():
        shutil.rmtree(venv)
    if python.exists() and _installed_versions(python) == ("2.13.0", "0.1.5"):
        return python
    _log(f"installing {TORCH_REQUIREMENT} and {MERGEKIT_REQUIREMENT} into {venv} (pip, PyPI) ...")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    torch_index = ["--index-url", torch_index_url] if torch_index_url else []
    subprocess.run([*pip, *torch_index, TORCH_REQUIREMENT], check=True)
    subprocess.run([*pip, MERGEKIT_REQUIREMENT], check=True)
    if _installed_versions(python) != ("2.13.0", "0.1.5"):
        raise SystemExit(f"error: {venv} does not hold torch 2.13.0 and mergekit 0.1.5 after pip")
    return python


def _installed_versions(python: Path) -> tuple[str, str] | None:
    code = ("from importlib.metadata import version as v; "
            "print(v('torch').split('+')[0], v('mergekit'))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    parts = done.stdout.split()
    return (parts[0], parts[1]) if done.returncode == 0 and len(parts) == 2 else None


def ensure_models(work: Path, *, rebuild: bool) -> None:
    """Build the float32 and bfloat16 model sets once; a stamp records how they were built."""
    spec = {"names": list(MODEL_NAMES), "hidden_size": 64, "num_layers": 4, "vocab_size": 300,
            "seed": 0}
    for tag, (dtype, tied) in MODEL_SETS.items():
        folder = work / MODELS_DIR / tag
        stamp = folder / "parity-stamp.json"
        wanted = json.dumps({**spec, "dtype": str(dtype), "tied": tied}, sort_keys=True)
        if not rebuild and stamp.is_file() and stamp.read_text() == wanted:
            continue
        _log(f"building {len(MODEL_NAMES)} {tag} models in {folder} ...")
        build_demo_models(folder, names=MODEL_NAMES, hidden_size=64, num_layers=4,
                          vocab_size=300, dtype=dtype, tie_word_embeddings=tied, seed=0)
        stamp.write_text(wanted)


UNION_ADDED = {  # model -> tokens its tokenizer adds after the 260 shared ones (union recipes)
    "base": (), "math": ("<|im_start|>", "<|math|>"), "code": ("<|code|>", "<|im_start|>", "<|im_end|>"),
    "chat": ("<|im_end|>", "<|im_start|>", "<|chat|>"),
}


def ensure_union_models(work: Path) -> None:
    """parity-models/union: the f32 models, each tokenizer with added tokens of its own (the same
    token at different ids across models, and tokens only one model has); weights unchanged."""
    source, target = work / MODELS_DIR / "f32", work / MODELS_DIR / "union"
    stamp = target / "parity-stamp.json"
    wanted = json.dumps({"from": (source / "parity-stamp.json").read_text(), "added": UNION_ADDED},
                        sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    for name, added in UNION_ADDED.items():
        path = target / name / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        first = 1 + max(e["id"] for e in data["added_tokens"])
        first = max(first, 1 + max(data["model"]["vocab"].values()))
        data["added_tokens"] += [{"id": first + i, "content": token, "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True}
                                 for i, token in enumerate(added)]
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    stamp.write_text(wanted)


def output_vocab(folder: Path) -> dict[str, int]:
    """Token → id of the tokenizer a tool wrote (its tokenizer.json's vocabulary and added tokens)."""
    from fusekit.vocab import read_vocab

    return read_vocab(folder.name, folder).tokens


def align_theirs_by_token(ours_dir: Path, theirs_dir: Path,
                          theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mergekit's embedding and LM-head rows reordered into fusekit's token ids (mergekit numbers
    the union's new tokens in an order that depends on Python's set order); rows past the
    vocabulary (padding) stay where they are."""
    from fusekit.vocab import is_vocab_tensor

    ours_vocab, theirs_vocab = output_vocab(ours_dir), output_vocab(theirs_dir)
    if set(ours_vocab) != set(theirs_vocab):
        return theirs  # different vocabularies: the comparison reports the shapes or values
    order = [theirs_vocab[token] for token, _ in sorted(ours_vocab.items(), key=lambda item: item[1])]
    result = dict(theirs)
    for name, tensor in theirs.items():
        if is_vocab_tensor(name) and tensor.shape[0] >= len(order):
            index = torch.tensor(order + list(range(len(order), tensor.shape[0])))
            result[name] = tensor.index_select(0, index)
    return result


def uses_tokenizer_surgery(recipe: Recipe) -> bool:
    data = yaml.safe_load(recipe.path.read_text(encoding="utf-8"))
    return bool(data.get("tokenizer_source") or data.get("tokenizer"))


def largest_tensor(work: Path) -> int:
    """Element count of the largest input tensor (decides whether arcee_fusion samples)."""
    tensors = load_folder(work / MODELS_DIR / "f32" / "base")
    return max(t.numel() for t in tensors.values())


def find_recipes(folder: Path, patterns: Sequence[str]) -> list[Recipe]:
    recipes = []
    for path in sorted(folder.glob("*.yaml")):
        if patterns and not any(fnmatch.fnmatchcase(path.stem, p) for p in patterns):
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        recipes.append(Recipe(path.stem, path.resolve(), str(data["merge_method"]),
                              data.get("base_model")))
    return recipes


def fusekit_methods() -> frozenset[str]:
    from fusekit.ops import method_names

    return frozenset(method_names())


# --- running the tools --------------------------------------------------------------------------

# Runs in either venv. It imports a tool once, then forks a child per job, so every merge starts
# from a fresh interpreter state (as a new process would) without paying the import each time.
# A job is one JSON line {"entry", "argv", "log", "stable_sort"}; the reply is {"rc": N}.
DRIVER = """\
import importlib, json, os, sys, traceback
def stable(function):
    return lambda *args, stable=None, **kwargs: function(*args, stable=True, **kwargs)
def child(job):
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1); os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.stdout = os.fdopen(1, "w", buffering=1); sys.stderr = os.fdopen(2, "w", buffering=1)
    if job["stable_sort"]:  # diagnostic: make torch.sort/argsort break ties by index
        import torch
        torch.sort, torch.argsort = stable(torch.sort), stable(torch.argsort)
    module, _, name = job["entry"].partition(":")
    entry = getattr(importlib.import_module(module), name)
    try:
        if callable(getattr(entry, "main", None)):  # a click command (mergekit-yaml)
            entry.main(args=job["argv"], prog_name=name)
        else:
            entry(job["argv"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
for module in [sys.argv[1].partition(":")[0], *sys.argv[2:]]:
    importlib.import_module(module)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(job)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""
DRIVER_FILE = "parity_driver.py"
MERGEKIT_ENTRY = "mergekit.scripts.run_yaml:main"
FUSEKIT_ENTRY = "fusekit.cli:main"
FUSEKIT_PRELOAD = ("fusekit.merging",)  # fusekit.cli imports the merge machinery lazily


class Tool:
    """One tool's driver process: ``run`` merges a recipe in a forked child and returns its status.

    With ``fresh`` a new driver process is started for every job (slower; for the suspicious).
    """

    def __init__(self, python: Path, entry: str, preload: Sequence[str], env: Mapping[str, str],
                 cwd: Path, *, fresh: bool) -> None:
        self.command = [str(python), str(cwd / DRIVER_FILE), entry, *preload]
        self.entry, self.env, self.cwd, self.fresh = entry, dict(env), cwd, fresh
        self.process: subprocess.Popen[str] | None = None

    def run(self, argv: Sequence[str], log: Path, *, stable_sort: bool = False) -> int:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdin is not None and self.process.stdout is not None
        job = {"entry": self.entry, "argv": list(argv), "log": str(log), "stable_sort": stable_sort}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        reply = self.process.stdout.readline()
        if self.fresh:
            self.close()
        return int(json.loads(reply)["rc"]) if reply else -1

    def close(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait()
            self.process = None


@dataclass
class Tools:
    """A mergekit and a fusekit driver, used by one worker thread at a time."""

    mergekit: Tool
    fusekit: Tool

    def close(self) -> None:
        self.mergekit.close()
        self.fusekit.close()


def make_tools(settings: Settings) -> Tools:
    base_env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    # offline: every model is local; CPU only; a fixed hash seed, because mergekit picks the
    # donor of config.json and tokenizer from a set() when there is no base_model
    base_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="")
    fresh = settings.fresh_processes
    return Tools(Tool(settings.mergekit_python, MERGEKIT_ENTRY, (), base_env, settings.work,
                      fresh=fresh),
                 Tool(Path(sys.executable), FUSEKIT_ENTRY, FUSEKIT_PRELOAD,
                      dict(os.environ, **base_env), settings.work, fresh=fresh))


def tool_arguments(settings: Settings, recipe: Recipe, out: Path) -> list[str]:
    """Arguments both ``mergekit-yaml`` and ``fusekit merge`` read alike."""
    return [str(recipe.path), str(out), "--device", "cpu", "--copy-tokenizer", "--out-shard-size",
            settings.shard_size, "--random-seed", str(settings.seed), "--quiet"]


def run_tool(tool: Tool, argv: list[str], out: Path, *, stable_sort: bool = False) -> str | None:
    """None when the merge succeeded, else its exit status and last line of output."""
    log = out.with_name(out.name + ".log")
    code = tool.run(argv, log, stable_sort=stable_sort)
    if code == 0:
        return None
    text = log.read_text(errors="replace") if log.is_file() else "the tool's driver process died"
    lines = [line for line in text.splitlines() if line.strip()]
    return f"exit {code}: {lines[-1].strip() if lines else 'no output'}"


# --- comparing ----------------------------------------------------------------------------------


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@dataclass(frozen=True)
class TensorCheck:
    max_diff: float
    bitwise: bool
    flips: int
    too_far: int


def check_tensor(ours: torch.Tensor, theirs: torch.Tensor, rtol: float) -> TensorCheck:
    """Compare fusekit's tensor with mergekit's (same dtype and shape) in float64."""
    bitwise = torch.equal(_bits(ours), _bits(theirs))
    a, b = ours.double(), theirs.double()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, 0.0, (a - b).abs()).nan_to_num(nan=math.inf)
    finite = b[b.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    beyond = diff > rtol * scale
    flips = 0
    if ours.is_floating_point() and torch.finfo(ours.dtype).bits < 32:
        one_ulp = beyond & (diff <= _ulp(torch.maximum(a.abs(), b.abs()), ours.dtype))
        flips = int(one_ulp.sum())
        beyond &= ~one_ulp
    max_diff = float(diff.max()) if diff.numel() else 0.0
    return TensorCheck(max_diff, bitwise, flips, int(beyond.sum()))


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each value of ``magnitude`` (float64), for normal numbers."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(magnitude.clamp(min=info.tiny))
    return info.eps * torch.pow(2.0, exponent.double() - 1)


def compare_structure(row: Row, ours: Mapping[str, torch.Tensor],
                      theirs: Mapping[str, torch.Tensor]) -> list[str]:
    """Names present in both with equal dtype and shape; notes the rest as differences."""
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if only_ours:
        row.fail("DIFF", f"only in fusekit: {_few(only_ours)}")
    if only_theirs:
        row.fail("DIFF", f"only in mergekit: {_few(only_theirs)}")
    common = []
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            row.fail("DIFF", f"{name}: fusekit {_desc(a)} vs mergekit {_desc(b)}")
        else:
            common.append(name)
    return common


def _desc(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


def _few(names: Sequence[str], limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass(frozen=True)
class Verdict:
    """The numeric comparison of two outputs over their common tensors."""

    max_diff: float
    bitwise: bool
    notes: tuple[str, ...]
    failures: tuple[str, ...]


def numeric_verdict(settings: Settings, ours: Mapping[str, torch.Tensor],
                    theirs: Mapping[str, torch.Tensor], names: Sequence[str]) -> Verdict:
    checks = {name: check_tensor(ours[name], theirs[name], settings.rtol) for name in names}
    notes, failures = [], []
    differing = [name for name, c in checks.items() if not c.bitwise]
    if differing:
        notes.append(f"{len(differing)}/{len(checks)} tensors not bit-equal")
    far = sorted(((c.too_far, name) for name, c in checks.items() if c.too_far), reverse=True)
    if far:
        worst = checks[far[0][1]]
        failures.append(f"beyond tolerance in {len(far)} tensors (worst {far[0][1]}: "
                        f"{worst.too_far}/{ours[far[0][1]].numel()} entries, "
                        f"max {worst.max_diff:.3g})")
    flips = sum(c.flips for c in checks.values())
    total = sum(ours[name].numel() for name in names) or 1
    if flips:
        notes.append(f"{flips} one-ulp rounding flips ({flips / total:.2e} of entries)")
        if flips / total > settings.flip_fraction:
            failures.append(f"flips above --flip-fraction {settings.flip_fraction:g}")
    return Verdict(max((c.max_diff for c in checks.values()), default=0.0), not differing,
                   tuple(notes), tuple(failures))


def compare_deterministic(row: Row, settings: Settings, ours: Mapping[str, torch.Tensor],
                          theirs: Mapping[str, torch.Tensor]) -> bool:
    """Fill the row; True when the tensors differ beyond tolerance (names, dtypes aside)."""
    common = compare_structure(row, ours, theirs)
    verdict = numeric_verdict(settings, ours, theirs, common)
    row.max_diff = verdict.max_diff
    row.bytes_equal = row.status == "ok" and verdict.bitwise
    row.notes.extend(verdict.notes)
    for failure in verdict.failures:
        row.fail("DIFF", failure)
    return bool(verdict.failures)


def explain_tie_order(row: Row, settings: Settings, tools: Tools, recipe: Recipe, folder: Path,
                      ours: Mapping[str, torch.Tensor]) -> None:
    """Rerun mergekit with index-ordered (stable) sorting; if that matches, the only difference
    is which of several equal magnitudes each tool keeps at the density cut-off."""
    stable_dir = folder / "mergekit-stable-sort"
    error = run_tool(tools.mergekit, tool_arguments(settings, recipe, stable_dir), stable_dir,
                     stable_sort=True)
    if error:
        row.notes.append(f"mergekit with stable sort failed: {error}")
        return
    stable = load_folder(stable_dir)
    names = sorted(set(ours) & set(stable))
    verdict = numeric_verdict(settings, ours, stable, names)
    if set(stable) == set(ours) and not verdict.failures:
        same = "bit-equal" if verdict.bitwise else "within tolerance"
        row.notes.append(f"{same} to mergekit run with stable torch.sort/argsort: differs only in "
                         "which equal magnitudes are kept at the cut-off")
        if row.status == "DIFF":
            row.status = "tie-order"
    else:
        row.notes.append("mergekit with stable sort differs too: not only tie order")


def task_vector_stats(out: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                      names: Iterable[str]) -> tuple[float, float]:
    """(share of entries differing from the base, L2 norm of out - base), over ``names``."""
    kept = total = 0
    square = 0.0
    for name in names:
        if name not in base or base[name].shape != out[name].shape:
            continue
        delta = out[name].double() - base[name].double()
        kept += int((delta != 0).sum())
        total += delta.numel()
        square += float(delta.square().sum())
    return kept / max(total, 1), math.sqrt(square)


def compare_stochastic(row: Row, settings: Settings, recipe: Recipe,
                       ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor],
                       rerun: Mapping[str, torch.Tensor]) -> None:
    common = compare_structure(row, ours, theirs)
    if recipe.base is None:
        row.fail("ERROR", "stochastic recipe without base_model: nothing to measure against")
        return
    base = load_folder(settings.work / recipe.base)
    kept_ours, norm_ours = task_vector_stats(ours, base, common)
    kept_theirs, norm_theirs = task_vector_stats(theirs, base, common)
    ratio = norm_ours / norm_theirs if norm_theirs else math.inf
    row.notes.append(f"stochastic: kept mk {kept_theirs:.4f} fk {kept_ours:.4f}; "
                     f"|task vector| fk/mk {ratio:.4f}")
    if abs(kept_ours - kept_theirs) > settings.kept_tol:
        row.fail("DIFF", f"kept fractions differ by more than {settings.kept_tol:g}")
    if not abs(ratio - 1) <= settings.norm_tol:
        row.fail("DIFF", f"task-vector norms differ by more than {settings.norm_tol:g}")
    same_seed = set(rerun) == set(ours) and all(
        torch.equal(_bits(rerun[n]), _bits(ours[n])) for n in ours)
    if not same_seed:
        row.fail("DIFF", "fusekit is not reproducible with the same --random-seed")
    else:
        row.notes.append("fusekit same seed -> same bytes")


def compare_side_files(row: Row, ours: Path, theirs: Path) -> None:
    """config.json key by key (a difference fails), and which other files each tool wrote."""
    files_ours, files_theirs = _side_files(ours), _side_files(theirs)
    if files_theirs - files_ours:
        row.notes.append(f"files only from mergekit: {_few(sorted(files_theirs - files_ours))}")
    if files_ours - files_theirs:
        row.notes.append(f"files only from fusekit: {_few(sorted(files_ours - files_theirs))}")
    config_ours, config_theirs = _config(ours), _config(theirs)
    keys = sorted(k for k in set(config_ours) | set(config_theirs)
                  if config_ours.get(k) != config_theirs.get(k))
    if keys:
        shown = "; ".join(f"{k}: fk {config_ours.get(k)!r} mk {config_theirs.get(k)!r}"
                          for k in keys[:3])
        row.fail("DIFF", f"config.json differs ({shown})")


def _side_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()
            if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json"
            and p.name not in SIDE_FILES_IGNORED}


def _config(folder: Path) -> dict[str, object]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("transformers_version", None)
    return dict(config)


# --- one recipe ---------------------------------------------------------------------------------


def is_stochastic(method: str, largest: int) -> bool:
    return method in STOCHASTIC or (method == "arcee_fusion" and largest > ARCEE_SAMPLE_ELEMENTS)


def run_recipe(settings: Settings, tools: Tools, recipe: Recipe) -> Row:
    started = time.perf_counter()
    row = Row(recipe.name, recipe.method)
    folder = settings.work / "out" / recipe.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        _run_and_compare(row, settings, tools, recipe, folder)
    finally:
        if not settings.keep:
            shutil.rmtree(folder, ignore_errors=True)
        row.seconds = time.perf_counter() - started
    return row


def _run_and_compare(row: Row, settings: Settings, tools: Tools, recipe: Recipe,
                     folder: Path) -> None:
    theirs_dir, ours_dir = folder / "mergekit", folder / "fusekit"
    error = run_tool(tools.mergekit, tool_arguments(settings, recipe, theirs_dir), theirs_dir)
    if error:
        row.fail("ERROR", f"mergekit failed: {error}")
    if recipe.method not in settings.known_methods:
        row.status = "skip" if row.status == "ok" else row.status
        row.notes.insert(0, "fusekit: unknown method")
        return
    fusekit_argv = ["merge", *tool_arguments(settings, recipe, ours_dir)]
    ours_error = run_tool(tools.fusekit, fusekit_argv, ours_dir)
    if ours_error:
        row.fail("ERROR", f"fusekit failed: {ours_error}")
    if error or ours_error:
        return
    ours, theirs = load_folder(ours_dir), load_folder(theirs_dir)
    if uses_tokenizer_surgery(recipe):
        theirs = align_theirs_by_token(ours_dir, theirs_dir, theirs)
    row.tensors = len(theirs)
    row.stochastic = is_stochastic(recipe.method, settings.largest_tensor)
    if row.stochastic:
        rerun_dir = folder / "fusekit-rerun"
        rerun_argv = ["merge", *tool_arguments(settings, recipe, rerun_dir)]
        rerun = {} if run_tool(tools.fusekit, rerun_argv, rerun_dir) else load_folder(rerun_dir)
        compare_stochastic(row, settings, recipe, ours, theirs, rerun)
    elif compare_deterministic(row, settings, ours, theirs) and recipe.method in TIE_SENSITIVE:
        explain_tie_order(row, settings, tools, recipe, folder, ours)
    compare_side_files(row, ours_dir, theirs_dir)


# --- report -------------------------------------------------------------------------------------


def format_table(rows: Sequence[Row]) -> str:
    lines = ["| recipe | method | status | tensors | max \\|diff\\| | bytes equal | notes |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        max_diff = "-" if row.max_diff is None else f"{row.max_diff:.3g}"
        if row.stochastic:
            max_diff = "n/a (random)"
        bytes_equal = {None: "-", True: "yes", False: "no"}[row.bytes_equal]
        notes = "; ".join(row.notes).replace("|", "\\|")
        lines.append(f"| {row.recipe} | {row.method} | {row.status} | {row.tensors or '-'} | "
                     f"{max_diff} | {bytes_equal} | {notes} |")
    return "\n".join(lines)


def write_report(settings: Settings, rows: Sequence[Row], seconds: float) -> Path:
    statuses = ("ok", "DIFF", "tie-order", "ERROR", "skip")
    counts = {s: sum(r.status == s for r in rows) for s in statuses}
    header = [
        "# fusekit vs mergekit 0.1.5 parity",
        "",
        f"{len(rows)} recipes in {seconds:.0f} s: " + ", ".join(f"{n} {s}" for s, n in
                                                               counts.items()),
        f"seed {settings.seed}, shard size {settings.shard_size}, rtol {settings.rtol:g}, "
        f"flip fraction {settings.flip_fraction:g}, kept tol {settings.kept_tol:g}, "
        f"norm tol {settings.norm_tol:g}; models: {settings.work / MODELS_DIR}",
        "",
        "",
    ]
    path = settings.work / "parity.md"
    path.write_text("\n".join(header) + format_table(rows) + "\n", encoding="utf-8")
    return path


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_all(settings: Settings, recipes: Sequence[Recipe], jobs: int) -> list[Row]:
    """Run the recipes on ``jobs`` threads, each with its own pair of tool drivers."""
    (settings.work / DRIVER_FILE).write_text(DRIVER, encoding="utf-8")
    idle: queue.SimpleQueue[Tools] = queue.SimpleQueue()
    pairs = [make_tools(settings) for _ in range(max(1, min(jobs, len(recipes))))]
    for tools in pairs:
        idle.put(tools)

    def one(recipe: Recipe) -> Row:
        tools = idle.get()
        try:
            row = run_recipe(settings, tools, recipe)
        finally:
            idle.put(tools)
        _log(f"{row.recipe}: {row.status} ({row.seconds:.1f} s)")
        return row

    try:
        with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
            return list(pool.map(one, recipes))
    finally:
        for tools in pairs:
            tools.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    recipes = find_recipes(args.recipes, args.only)
    known = fusekit_methods()
    if args.list:
        for recipe in recipes:
            print(f"{recipe.name}\t{recipe.method}\t{'' if recipe.method in known else 'unknown'}")
        return 0
    if not recipes:
        _log(f"error: no recipe in {args.recipes} matches {args.only}")
        return 2
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    venv = (args.venv or work / "venv-mergekit").absolute()
    python = ensure_venv(venv, reinstall=args.reinstall, torch_index_url=args.torch_index_url)
    ensure_models(work, rebuild=args.rebuild_models)
    ensure_union_models(work)
    settings = Settings(work, python, args.shard_size, args.seed, args.rtol, args.flip_fraction,
                        args.kept_tol, args.norm_tol, args.keep, known, largest_tensor(work),
                        args.fresh_processes)
    started = time.perf_counter()
    rows = run_all(settings, recipes, args.jobs)
    seconds = time.perf_counter() - started
    print(format_table(rows))
    report = write_report(settings, rows, seconds)
    _log(f"{len(rows)} recipes in {seconds:.1f} s; report: {report}")
    failing = {"DIFF", "ERROR"} | (set() if args.allow_tie_order else {"tie-order"})
    return 1 if any(row.status in failing for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
