"""fusekit installs the ways its messages say: ``python -m build`` makes an sdist and a wheel that hold
every module and data file, the wheel installs into a fresh venv and runs, the CI template installs
from the repository (fusekit is on no package index), and every install hint names packages pip can
fetch (``fusekit[lm]`` is not one of them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

import fusekit
from fusekit.extras import EXTRAS, install_hint

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fusekit"
SOURCES = ("fusekit", "configs", "scripts", "tests", "pyproject.toml", "README.md", "CHANGELOG.md",
           "MANIFEST.in")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_files() -> set[str]:
    """Every file of the package as the wheel must hold it: ``fusekit/io/refs.py``, templates, py.typed."""
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


# -- install hints ----------------------------------------------------------------------------------


def test_extras_in_hints_match_pyproject_and_dev_holds_them_all() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    for name, requirements in EXTRAS.items():
        assert tuple(extras[name]) == requirements, f"fusekit/extras.py: {name} differs from pyproject.toml"
    for name, requirements in extras.items():
        missing = set(requirements) - set(extras["dev"])
        assert name == "dev" or not missing, f"the dev extra lacks {missing} of '{name}'"
    assert any(r.startswith("build") for r in extras["dev"]), "dev needs build for the wheel test"


def test_install_hints_name_installable_packages() -> None:
    hint = install_hint("lora")
    assert hint.startswith("pip install 'peft>=0.13' 'transformers>=4.45' ")
    assert "pip install -e '.[lora]'" in hint and "fusekit[" not in hint
    bad = re.compile(r"fusekit\[|huggingface-cli|pip install (['\"]?)fusekit\b")
    sources = [p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
               if p.name != "extras.py"]  # which explains why
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sources
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert found == [], f"install hints that no package index answers: {found}"


def test_offline_hint_says_hf_download(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from fusekit.errors import CheckpointNotFoundError
    from fusekit.io.refs import resolve_model

    def offline(*args: object, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointNotFoundError, match=r"\(hf download some-org/some-model --revision v2\)"):
        resolve_model("some-org/some-model@v2")


def test_ci_template_installs_fusekit_from_the_repository() -> None:
    workflow = yaml.safe_load((ROOT / "configs/ci/rebuild-merge.yaml").read_text(encoding="utf-8"))
    job = next(iter(workflow["jobs"].values()))
    package = str(job["env"]["FUSEKIT_PACKAGE"])
    assert package == "." or re.fullmatch(r"fusekit @ git\+https://\S+@\S+", package), package
    runs = [step.get("run", "") for step in job["steps"]]
    install = next(run for run in runs if 'pip install "$FUSEKIT_PACKAGE"' in run)
    assert "fusekit --version" in install
    assert not any(re.search(r"pip install ['\"]?fusekit\b", run) for run in runs)
    checkout = [i for i, step in enumerate(job["steps"])
                if step.get("uses", "").startswith("actions/checkout")]
    assert checkout and checkout[0] < runs.index(install), "the repository must be checked out first"


# -- the wheel --------------------------------------------------------------------------------------


def _build(tmp_path: Path) -> tuple[Path, Path]:
    """The sdist and the wheel ``python -m build`` makes from a copy of the source tree (the wheel
    is built from the sdist, so the sdist must be complete); offline, with this venv's setuptools."""
    source = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdist, = dist.glob("fusekit-*.tar.gz")
    wheel, = dist.glob("fusekit-*-py3-none-any.whl")
    return sdist, wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed by pip (no index, no dependencies); the dependencies,
    torch included, are this venv's, reached through a .pth file rather than downloaded."""
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-index", "--no-cache-dir", "--quiet", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


@pytest.mark.packaging
@pytest.mark.skipif(not os.environ.get("CI") and not os.environ.get("FUSEKIT_TEST_PACKAGING"),
                    reason="builds and installs the wheel (~30 s); set CI or FUSEKIT_TEST_PACKAGING")
def test_wheel_builds_installs_and_runs(tmp_path: Path) -> None:
    sdist, wheel = _build(tmp_path)
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert _package_files() <= in_wheel, f"missing from the wheel: {sorted(_package_files() - in_wheel)}"
    assert "fusekit/chat_templates/chatml.jinja" in in_wheel and "fusekit/py.typed" in in_wheel
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = _package_files() | {"pyproject.toml", "README.md", "configs/linear.yaml", "tests/conftest.py"}
    assert needed <= in_sdist, f"missing from the sdist: {sorted(needed - in_sdist)}"

    venv = _fresh_venv(tmp_path, wheel)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(venv / "bin" / "fusekit"), "--version"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout == f"fusekit {fusekit.__version__}\n", run.stderr
    code = ("import fusekit, fusekit.io.refs, fusekit.cli.app\n"
            "from fusekit.chat_templates import load_template, template_names\n"
            "assert template_names() and all(load_template(n) for n in template_names())\n"
            "print(fusekit.__file__)\n")
    check = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                           cwd=tmp_path, env=env, timeout=120)
    assert check.returncode == 0, check.stderr
    assert Path(check.stdout.strip()).is_relative_to(venv), check.stdout  # the wheel's copy, not the checkout
