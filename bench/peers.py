"""Load the peer libraries the benchmarks compare against, without their heavy imports.

MosaicML Streaming (`mosaicml-streaming`) and LitData (`litdata`) are installed for the
benchmarks only, by `make bench-setup` (bench/requirements-peers.txt, `pip install
--no-deps`, see docs/BENCHMARKS.md): their declared requirements would replace the CPU build
of torch and downgrade numpy. Installed that way, `import streaming` fails: the package's
`__init__.py` imports `streaming.vision` (torchvision) and `streaming.base.dataloader`
(transformers), none of which the benchmarks use. `load_streaming()` therefore registers
`streaming` and `streaming.base` as bare packages (a module with the installed `__path__`, so
that their submodules import from the installed files as usual) and imports only the modules
that hold `StreamingDataset` and `MDSWriter`. Everything those classes run is the installed
code, unchanged. `import litdata` works as is once `lightning-utilities` is installed
(torchvision is only imported to decode images, which the benchmarks do not store).

`why_not(load)` says why a peer cannot be used here (None when it can), for the benchmarks'
"not measured" lines. `python bench/peers.py` is the check `make bench-setup` runs: the
versions of torch and numpy, then for each peer a small dataset written and read back through
a shuffled epoch with the loader the benchmarks use, asserting that every sample comes back
exactly once with its values.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

HEAVY = ("torchvision", "transformers")


def _bare_package(name: str, path: str) -> None:
    """Register `name` as a package whose `__init__.py` is not executed."""
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [path]
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [path]
    sys.modules[name] = module
    if "." in name:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)


def load_streaming() -> types.SimpleNamespace:
    """MosaicML Streaming's `StreamingDataset` and `MDSWriter`, without torchvision/transformers.

    Raises ImportError (with the reason) when the package or one of its runtime needs
    (xxhash, zstd, python-snappy, Brotli, catalogue) is missing.
    """
    if "streaming.base.dataset" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mosaicml-streaming is not installed")
        root = list(spec.submodule_search_locations)[0]
        if "streaming" not in sys.modules:  # a real import that worked is left as it is
            _bare_package("streaming", root)
            _bare_package("streaming.base", str(Path(root) / "base"))
    dataset = importlib.import_module("streaming.base.dataset")
    writer = importlib.import_module("streaming.base.format.mds.writer")
    util = importlib.import_module("streaming.base.util")
    version = importlib.import_module("streaming._version").__version__
    return types.SimpleNamespace(StreamingDataset=dataset.StreamingDataset,
                                 MDSWriter=writer.MDSWriter,
                                 clean_stale_shared_memory=util.clean_stale_shared_memory,
                                 version=version)


def load_litdata() -> types.SimpleNamespace:
    """LitData's `optimize` and `StreamingDataset` (a plain import: nothing heavy at import)."""
    import litdata

    return types.SimpleNamespace(optimize=litdata.optimize,
                                 StreamingDataset=litdata.StreamingDataset,
                                 version=litdata.__version__)


def why_not(load) -> str | None:
    """None when `load()` works, else a one-line reason for a "not measured" line."""
    try:
        load()
    except Exception as e:  # not installed, or a runtime need missing
        return f"{type(e).__name__}: {str(e)[:160]}"
    return None


# The check `make bench-setup` runs -------------------------------------------------------

def _arrays(n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, 1024), dtype=np.float32),
            rng.standard_normal((n, 256), dtype=np.float32), np.arange(n) % 10)


def check_epoch(name: str, batches, columns: dict, quiet: bool = False) -> None:
    """Every sample once, its values equal to `columns[c][id]` for each column c (an "id"
    column names the row), and the order shuffled."""
    import numpy as np

    seen = []
    for batch in batches:
        ids = batch["id"].numpy()
        for c, values in columns.items():
            assert np.array_equal(batch[c].numpy(), values[ids]), (name, c)
        seen.extend(ids.tolist())
    n = len(next(iter(columns.values())))
    assert sorted(seen) == list(range(n)), f"{name}: not every sample exactly once"
    assert seen != sorted(seen), f"{name}: epoch not shuffled"
    if not quiet:
        print(f"  {name}: {len(seen)} samples, each once, values equal to the arrays, shuffled")


def _check_streaming(tmp: Path, a, b, y, workers: int) -> None:
    from torch.utils.data import DataLoader

    ms = load_streaming()
    out = tmp / "mds"
    cols = {"id": "int", "a": "ndarray:float32:1024", "b": "ndarray:float32:256", "cls": "int"}
    with ms.MDSWriter(out=str(out), columns=cols, size_limit=1 << 20) as w:
        for i in range(len(y)):
            w.write({"id": i, "a": a[i], "b": b[i], "cls": int(y[i])})
    ds = ms.StreamingDataset(local=str(out), shuffle=True, shuffle_algo="naive", batch_size=64)
    check_epoch(f"MosaicML Streaming {ms.version}, MDS, {workers} workers",
                 DataLoader(ds, batch_size=64, num_workers=workers), {"a": a, "b": b, "cls": y})


def _lit_sample(i: int) -> dict:
    a, b, y = _CHECK
    return {"id": i, "a": a[i], "b": b[i], "cls": int(y[i])}


_CHECK: tuple = ()


def _check_litdata(tmp: Path, a, b, y, workers: int) -> None:
    from torch.utils.data import DataLoader

    ld = load_litdata()
    global _CHECK
    _CHECK = (a, b, y)
    out = tmp / "lit"
    ld.optimize(fn=_lit_sample, inputs=list(range(len(y))), output_dir=str(out),
                chunk_bytes="1MB", num_workers=1, verbose=False, start_method="fork")
    ds = ld.StreamingDataset(input_dir=str(out), shuffle=True)
    check_epoch(f"litdata {ld.version}, optimize + StreamingDataset, {workers} workers",
                 DataLoader(ds, batch_size=64, num_workers=workers), {"a": a, "b": b, "cls": y})


def main() -> None:
    import tempfile

    import numpy as np
    import torch

    print(f"torch {torch.__version__}, numpy {np.__version__}")
    a, b, y = _arrays(1000)
    failed = []
    for name, load, check in (("MosaicML Streaming", load_streaming, _check_streaming),
                              ("litdata", load_litdata, _check_litdata)):
        reason = why_not(load)
        if reason:
            print(f"  {name}: cannot be loaded here ({reason})")
            failed.append(name)
            continue
        for workers in (0, 2):
            with tempfile.TemporaryDirectory(prefix="midas-peers-check-") as tmp:
                check(Path(tmp), a, b, y, workers)
    heavy = [m for m in HEAVY if m in sys.modules]
    print(f"  heavy packages imported: {heavy or 'none'}")
    if failed or heavy:
        raise SystemExit(f"peer check failed: {failed or heavy}")


if __name__ == "__main__":
    main()
