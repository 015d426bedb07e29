"""The package's layers depend downwards only: library <- readers <- trainer <- command line.

- the library (midas_data/ except cli.py: dataset, features, mining, stream, loss and the
  shared modules) imports neither the readers (midas_data.pipelines) nor the trainer
  (midas_data.trainers) nor the command line;
- the readers (pipelines/) do not import the trainer or the command line;
- the trainer (trainers/) does not import the command line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# folder in the repository -> its package name once installed
PACKAGES = {"midas_data": "midas_data", "pipelines": "midas_data.pipelines",
            "trainers": "midas_data.trainers"}
UPPER = {"readers": ("midas_data.pipelines", "pipelines"),
         "trainer": ("midas_data.trainers", "trainers"), "cli": ("midas_data.cli",)}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(p for p in parts if p != "__init__")


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module that `source` (the text of `module`) imports, relative imports resolved,
    plus any string constant naming a module of this package (importlib.import_module
    targets, 'module:function' registry entries)."""
    here = module.split(".")
    package = here if is_package else here[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.split(":")[0]
            if text.startswith("midas_data.") and " " not in text:
                names.add(text)
    return names


def _file_imports(path: Path) -> set[str]:
    return imported_names(path.read_text(), _module_name(path), path.name == "__init__.py")


def _offenders_in(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return [n for n in sorted(names) if any(n == p or n.startswith(p + ".") for p in forbidden)]


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f.relative_to(REPO)} imports {name}" for f in files
            for name in _offenders_in(_file_imports(f), forbidden)]


def _library_files() -> list[Path]:
    return [f for f in sorted((REPO / "midas_data").rglob("*.py")) if f.name != "cli.py"]


def test_the_checker_sees_absolute_relative_and_lazy_imports():
    source = ("import midas_data.trainers.run\nfrom ..pipelines import text_encoder\n"
              "from . import knn\nx = importlib.import_module('midas_data.cli')\n")
    names = imported_names(source, "midas_data.mining.stage")
    assert {"midas_data.trainers.run", "midas_data.pipelines.text_encoder",
            "midas_data.mining.knn", "midas_data.cli"} <= names
    assert _offenders_in(names, UPPER["trainer"]) == ["midas_data.trainers.run"]


def test_library_imports_neither_readers_nor_trainer_nor_cli():
    files = _library_files()
    subpackages = {f.parent.name for f in files}
    assert {"dataset", "features", "mining", "stream", "loss"} <= subpackages
    forbidden = UPPER["readers"] + UPPER["trainer"] + UPPER["cli"]
    assert _offenders(files, forbidden) == []


def test_readers_do_not_import_the_trainer_or_cli():
    files = sorted((REPO / "pipelines").rglob("*.py"))
    assert files
    assert _offenders(files, UPPER["trainer"] + UPPER["cli"]) == []


def test_trainer_does_not_import_the_cli():
    files = sorted((REPO / "trainers").rglob("*.py"))
    assert files
    assert _offenders(files, UPPER["cli"]) == []


def test_importing_the_library_loads_no_reader_or_trainer():
    entries = ["midas_data", "midas_data.stream.dataset", "midas_data.mining.stage",
               "midas_data.features.extract", "midas_data.dataset.verify", "midas_data.loss"]
    code = (f"import sys, {', '.join(entries)}\n"
            "print(sorted(m for m in sys.modules if m.startswith(('midas_data.pipelines', "
            "'midas_data.trainers', 'midas_data.cli'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_public_api_is_exported_from_the_package():
    import midas_data

    missing = [n for n in midas_data.__all__ if not hasattr(midas_data, n)]
    assert missing == []
    assert len(set(midas_data.__all__)) == len(midas_data.__all__)
    for name in ("build_dataset", "open_dataset", "verify_dataset", "extract_features",
                 "ExtractConfig", "mine_misaligned", "MineConfig", "read_pairs", "MidasDataset",
                 "MidasLoader", "misaligned_loss", "register_encoder", "search_different_label"):
        assert name in midas_data.__all__, name
