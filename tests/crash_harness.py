"""Kill a pipeline stage with SIGKILL at random moments, check what readers see, rerun, compare.

A stage is a command line (`midas-data build-shards ...`, `midas-data extract ...`, mining,
`python -m midas_data.trainers ... --resume`). For each kill the harness

1. starts the command, sleeps a seeded random fraction of the stage's uninterrupted run time,
   and SIGKILLs it if it is still running (a kill "survived" is one whose aftermath passes);
2. checks every artifact with the readers users have (open_dataset + verify, read_features,
   read_pairs, load_checkpoint, the JSON files): each must be absent, the complete previous
   version, or the complete new one, byte for byte; anything else counts as bytes lost;
3. goes on to the next kill over whatever the last one left (reruns stack up, as in life).

Afterwards the stage runs to completion once more (a plain rerun, or `--resume`) and its
artifacts must equal those of an uninterrupted run: byte-identical shards, indexes, features
and pairs; the same metrics for training (wall-clock fields aside).

Writes are a small part of a stage's time, so every `os.fsync` of the killed commands is
preceded by a short sleep (MIDAS_CRASH_FSYNC_DELAY, via a sitecustomize module on
PYTHONPATH): a temp file then sits written-but-not-renamed long enough for random kills to
land inside atomic writes. The code under test is unchanged; only its timing is stretched.

Two ways to start a command, both through the same click entry point:
- "exec": a fresh interpreter running the installed command (what users run);
- "fork": a child forked from a `multiprocessing` forkserver that imported torch once, so a
  CI run affords dozens of kills of the torch stages (a fresh interpreter spends seconds
  importing torch alone).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_KEYS = {"epoch_time_s", "wall_time_s", "mean_epoch_time_s"}
FSYNC_DELAY = "0.03"
SITECUSTOMIZE = """
import os, time
_delay = float(os.environ.get("MIDAS_CRASH_FSYNC_DELAY") or 0)
if _delay:
    _fsync = os.fsync

    def fsync(fd):
        time.sleep(_delay)
        _fsync(fd)

    os.fsync = fsync
"""
PRELOAD = ["torch", "numpy", "pyarrow", "click", "midas_data.cli", "midas_data.features.extract",
           "midas_data.stream.dataset", "midas_data.mining.stage", "midas_data.trainers.run", "matplotlib.pyplot"]


# ------------------------------------------------------------------------------ starting commands


def _stretch_fsync(delay: float) -> None:
    if delay and not getattr(os.fsync, "stretched", False):
        real = os.fsync

        def fsync(fd):
            time.sleep(delay)
            real(fd)

        fsync.stretched = True
        os.fsync = fsync


def _run_in_child(program: str, argv: list[str], cwd: str, env: dict[str, str]) -> None:
    """Body of a forked child: the command line, as the console script would run it."""
    os.chdir(cwd)
    os.environ.update(env)
    _stretch_fsync(float(env["MIDAS_CRASH_FSYNC_DELAY"]))  # what sitecustomize does in exec mode
    code = 0
    try:
        import threading

        import torch
        from tqdm import tqdm

        torch.set_num_threads(1)
        # tqdm's default lock is a multiprocessing semaphore that a SIGKILLed child leaks
        tqdm.set_lock(threading.RLock())
        if program == "midas-data":
            from midas_data.cli import main
        elif program == "trainers":
            from midas_data.trainers.run import main
        else:  # "mine": the library call, for as long as the CLI has no mine-misaligned
            main = _mine_main
        main(argv, prog_name=program, standalone_mode=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit non-zero, like the console script
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _mine_main(argv: list[str], prog_name: str = "mine", standalone_mode: bool = True) -> None:
    from midas_data.mining.stage import mine_misaligned

    root, k = argv[0], int(argv[1])
    mine_misaligned(root, splits=("train",), k=k, progress=False)


def cli_has(command: str) -> bool:
    from midas_data.cli import main

    return command in main.commands


def mine_cli_available() -> bool:
    return cli_has("mine-misaligned")


def command_line(program: str, argv: list[str]) -> list[str]:
    """The exec form of a command."""
    if program == "midas-data":
        return [str(Path(sys.executable).with_name("midas-data")), *argv]
    if program == "trainers":
        return [sys.executable, "-m", "midas_data.trainers", *argv]
    code = ("import sys; from midas_data.mining.stage import mine_misaligned; "
            "mine_misaligned(sys.argv[1], splits=('train',), k=int(sys.argv[2]), progress=False)")
    return [sys.executable, "-c", code, *argv]


class Launcher:
    """Starts commands as fresh interpreters ("exec") or forkserver children ("fork")."""

    def __init__(self, mode: str, workdir: Path):
        self.mode, self.workdir = mode, workdir
        self.env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
                    "MIDAS_CRASH_FSYNC_DELAY": FSYNC_DELAY}
        self.site = workdir / "crash-site"
        self.site.mkdir(exist_ok=True)
        (self.site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        if mode == "fork":
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(PRELOAD)

    def start(self, program: str, argv: list[str]) -> _Handle:
        if self.mode == "fork":
            p = self.ctx.Process(target=_run_in_child,
                                 args=(program, argv, str(self.workdir), self.env), daemon=True)
            p.start()
            return _Handle(proc=p)
        log = open(self.workdir / "stderr.log", "ab")  # noqa: SIM115 - closed by _Handle
        env = {**os.environ, **self.env, "PYTHONPATH": f"{self.site}{os.pathsep}{REPO}"}
        p = subprocess.Popen(command_line(program, argv), cwd=self.workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=log)
        return _Handle(popen=p, log=log)

    def warm_up(self) -> None:
        """Start the forkserver (imports torch once) outside any timed run."""
        if self.mode == "fork":
            h = self.start("midas-data", ["--version"])
            h.wait(300)


@dataclass
class _Handle:
    proc: object = None
    popen: subprocess.Popen | None = None
    log: object = None

    def wait(self, timeout: float | None) -> bool:
        """True if the command finished within `timeout` seconds."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        self.proc.join(timeout)
        return self.proc.exitcode is not None

    def kill(self) -> None:
        if self.popen is not None:
            self.popen.kill()
        else:
            self.proc.kill()

    @property
    def exitcode(self) -> int | None:
        code = self.popen.returncode if self.popen is not None else self.proc.exitcode
        if self.log is not None and code is not None:
            self.log.close()
        return code


# ------------------------------------------------------------------------------ stages


def files(root: Path, patterns: list[str]) -> dict[str, bytes]:
    """The artifact files under `root` (hidden temp files excluded), as bytes."""
    out = {}
    for pat in patterns:
        for p in sorted(root.glob(pat)):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def strip_times(x):
    """Drop wall-clock fields; NaN/inf become None as in the JSON files (so a checkpoint's
    history compares with metrics.jsonl)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: strip_times(v) for k, v in x.items() if k not in TIME_KEYS}
    if isinstance(x, list):
        return [strip_times(v) for v in x]
    return x


@dataclass
class Stage:
    """One command and the rules its artifacts follow.

    run(config) gives the (program, argv) of the stage with config "A" (the one compared
    with the uninterrupted run) or "B" (the previous artifact it replaces, when the stage
    replaces one). `check(states)` judges the artifacts after a kill and returns the number
    of bytes a reader would get wrong; `final(baseline)` returns the bytes that differ from
    the uninterrupted run once the rerun finished.
    """

    name: str
    run: Callable[[str], tuple[str, list[str]]]
    reset: Callable[[], None]
    capture: Callable[[], dict]
    check: Callable[[dict, dict | None], tuple[int, int, list[str]]]
    final: Callable[[dict, dict], int]
    has_previous: bool = True
    temps: Callable[[], set] = set  # names of the temp files a killed write leaves behind
    known: Callable[[], str | None] = lambda: None  # a state that triggers a known bug


@dataclass
class Report:
    stage: str
    kills: int = 0
    finished_before_kill: int = 0
    checks: int = 0
    bytes_lost: int = 0
    vanished: int = 0
    final_mismatch_bytes: int = 0
    killed_mid_write: int = 0
    known_bug_states: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.stage}: {self.kills} kills survived ({self.killed_mid_write} mid-write), "
                f"{self.finished_before_kill} runs finished before their kill, "
                f"{self.bytes_lost} bytes lost, {self.vanished} "
                f"previous artifacts vanished, final mismatch {self.final_mismatch_bytes} bytes, "
                f"{self.seconds:.1f} s")


def run_to_end(launcher: Launcher, program: str, argv: list[str], timeout: float = 300) -> float:
    t0 = time.perf_counter()
    h = launcher.start(program, argv)
    if not h.wait(timeout):
        h.kill()
        h.wait(10)
        raise AssertionError(f"{program} {argv} did not finish within {timeout} s")
    if h.exitcode != 0:
        log = launcher.workdir / "stderr.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise AssertionError(f"{program} {argv} exited with {h.exitcode}\n{tail}")
    return time.perf_counter() - t0


def torture(stage: Stage, launcher: Launcher, kills: int, seed: int) -> Report:
    """Baselines, `kills` SIGKILLs at seeded random moments with checks, a final rerun."""
    t_start = time.perf_counter()
    rep = Report(stage.name)
    rng = random.Random(seed)
    # the uninterrupted run (A), and the previous artifact that A's reruns replace (B)
    stage.reset()
    duration = run_to_end(launcher, *stage.run("A"))
    baseline = stage.capture()
    previous = None
    stage.reset()
    if stage.has_previous:
        run_to_end(launcher, *stage.run("B"))
        previous = stage.capture()
    trials = 0
    while rep.kills < kills:
        trials += 1
        if trials > 4 * kills + 10:
            raise AssertionError(f"{stage.name}: could not kill {kills} runs in {trials} tries")
        temps_before = stage.temps()
        h = launcher.start(*stage.run("A"))
        if h.wait(rng.uniform(0.02, 1.0) * duration):
            rep.finished_before_kill += 1
            assert h.exitcode == 0, f"{stage.name}: a rerun failed with exit code {h.exitcode}"
        else:
            h.kill()
            assert h.wait(60), f"{stage.name}: killed process did not exit"
            if h.exitcode == -9:
                rep.kills += 1
                rep.killed_mid_write += bool(stage.temps() - temps_before)
                known = stage.known()
                if known:
                    rep.known_bug_states += 1
                    rep.notes.append(f"kill {rep.kills} left a state of a known bug: {known}")
            else:  # it finished between the timeout and the signal
                assert h.exitcode == 0, f"{stage.name}: a rerun failed with exit code {h.exitcode}"
                rep.finished_before_kill += 1
        lost, vanished, notes = stage.check(baseline, previous)
        rep.checks += 1
        rep.bytes_lost += lost
        rep.vanished += vanished
        rep.notes += notes
    run_to_end(launcher, *stage.run("A"))
    rep.final_mismatch_bytes = stage.final(baseline, stage.capture())
    rep.seconds = time.perf_counter() - t_start
    return rep


def _judge_files(now: dict[str, bytes], allowed: list[dict[str, bytes]], reader: Callable[[str], None],
                 names: list[str]) -> tuple[int, int, list[str]]:
    """Each named file: absent (if no allowed version has it), or byte-equal to one allowed
    version and accepted by `reader`. Returns (bytes lost, files vanished, notes)."""
    lost = vanished = 0
    notes = []
    for name in names:
        versions = [a[name] for a in allowed if name in a]
        if name not in now:
            if len(allowed) > 1 and name in allowed[1]:  # a previous version existed
                vanished += 1
                notes.append(f"{name}: vanished")
            continue
        data = now[name]
        if versions and data not in versions:
            lost += len(data)
            notes.append(f"{name}: {len(data)} bytes match no complete version")
            continue
        try:
            reader(name)
        except Exception as e:  # noqa: BLE001 - any reader failure is data lost
            lost += len(data)
            notes.append(f"{name}: reader failed ({type(e).__name__}: {e})")
    return lost, vanished, notes


# ------------------------------------------------------------------------------ the four stages


def build_stage(work: Path, mode: str) -> Stage:
    """`midas-data build-shards` of the bundled mfeat data (two small views), replacing an
    existing dataset (--overwrite) that was built with another shard size."""
    out = work / "built"
    patterns = ["manifest.json", "shards/*", "index/*"]

    def run(config: str):
        size = "300" if config == "A" else "700"
        return "midas-data", ["build-shards", "--pipeline", "mfeat", "--modalities", "mor,zer",
                              "--out", str(out), "--shard-samples", size, "--overwrite", "--quiet"]

    def check(baseline, previous):
        from midas_data import open_dataset

        now = files(out, patterns)
        if not now:
            return 0, (1 if previous else 0), ([f"{out}: vanished"] if previous else [])
        if now not in (baseline, previous):
            size = sum(map(len, now.values()))
            return size, 0, [f"{out}: {len(now)} files match no complete dataset"]
        try:
            ds = open_dataset(out)
            problems = ds.verify()
            assert problems == [], problems
            for sp in ds.splits:
                sr = ds.split(sp)
                assert len(sr.get_many(list(range(len(sr))))) == len(sr)
        except Exception as e:  # noqa: BLE001
            return sum(map(len, now.values())), 0, [f"{out}: {type(e).__name__}: {e}"]
        return 0, 0, []

    def final(baseline, now):
        return _diff_bytes(baseline, now)

    return Stage("build-shards", run, lambda: shutil.rmtree(out, ignore_errors=True),
                 lambda: files(out, patterns), check, final,
                 temps=lambda: _temps(out.parent, f".{out.name}.*"))


def extract_stage(dataset: Path) -> Stage:
    """`midas-data extract` (warm-up models), replacing features of another seed."""
    names = ["features/train.arrow", "features/val.arrow", "features/test.arrow",
             "features/warmup_models.pt"]

    def run(config: str):
        seed = "0" if config == "A" else "1"
        return "midas-data", ["extract", str(dataset), "--warmup-epochs", "4", "--feature-dim", "16",
                              "--batch-size", "16", "--threads", "1", "--seed", seed, "--device",
                              "cpu", "--quiet"]

    def reader(name: str) -> None:
        import torch

        from midas_data import open_dataset, read_features

        if name.endswith(".pt"):
            torch.load(dataset / name, weights_only=True)
        else:
            read_features(dataset / name, open_dataset(dataset).fingerprint)

    def check(baseline, previous):
        now = files(dataset, names)
        return _judge_files(now, [baseline] + ([previous] if previous else []), reader, names)

    return Stage("extract", run, lambda: shutil.rmtree(dataset / "features", ignore_errors=True),
                 lambda: files(dataset, names), check, lambda b, n: _diff_bytes(b, n),
                 temps=lambda: _temps(dataset / "features", ".*.tmp"))


def mine_stage(dataset: Path) -> Stage:
    """Mining (`midas-data mine-misaligned`, or the library call while the CLI lacks it),
    replacing pairs mined with another k."""
    names = ["pairs/train/part-00000-of-00001.arrow"]
    use_cli = mine_cli_available()

    def run(config: str):
        k = "4" if config == "A" else "3"
        if use_cli:
            return "midas-data", ["mine-misaligned", str(dataset), "--splits", "train", "--k", k,
                                  "--quiet"]
        return "mine", [str(dataset), k]

    def reader(name: str) -> None:
        from midas_data.mining.pairs import read_pairs

        t = read_pairs(dataset, "train")
        assert t.num_rows > 0

    def check(baseline, previous):
        now = files(dataset, names)
        return _judge_files(now, [baseline] + ([previous] if previous else []), reader, names)

    return Stage("mine-misaligned" + ("" if use_cli else " (library call)"), run,
                 lambda: shutil.rmtree(dataset / "pairs", ignore_errors=True),
                 lambda: files(dataset, names), check, lambda b, n: _diff_bytes(b, n),
                 temps=lambda: _temps(dataset / "pairs" / "train", ".*.tmp"))


def train_stage(dataset: Path, work: Path) -> Stage:
    """`midas-data train DATASET OUT --resume` (or `python -m midas_data.trainers` where the CLI has no
    train command), checkpointing every step."""
    out = work / "run"
    use_cli = cli_has("train")

    def run(config: str):
        argv = [str(dataset), str(out), "--preset", "mfeat", "--epochs", "4", "--warmup-epochs",
                "1", "--batch-size", "16", "--checkpoint-every", "1", "--device", "cpu", "--quiet",
                "--resume"]
        return ("midas-data", ["train", *argv]) if use_cli else ("trainers", argv)

    def capture() -> dict:
        state: dict = {}
        if (out / "metrics.jsonl").exists():
            state["metrics"] = [strip_times(json.loads(line))
                                for line in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "results.json").exists():
            state["results"] = strip_times(json.loads((out / "results.json").read_text()))
        if (out / "best.pt").exists():
            import torch

            state["best_model"] = torch.load(out / "best.pt", weights_only=True)["model"]
        return state

    def check(baseline, previous):
        import torch
        from midas_data.trainers import artifacts

        lost, notes = 0, []
        want = baseline["metrics"]
        for name in ("metrics.jsonl", "results.json", "last.pt", "best.pt"):
            p = out / name
            if not p.exists():
                continue
            try:
                if name == "metrics.jsonl":
                    got = [strip_times(json.loads(line)) for line in p.read_text().splitlines()]
                    assert got == want[:len(got)], "metrics differ from the uninterrupted run"
                elif name == "results.json":
                    got = strip_times(json.loads(p.read_text()))
                    assert got["test"] == baseline["results"]["test"], "different test metrics"
                elif name == "last.pt":
                    ck = artifacts.load_checkpoint(p)
                    hist = strip_times(ck["history"])
                    assert hist == want[:len(hist)], "checkpoint history differs"
                else:
                    best = torch.load(p, weights_only=True)
                    assert set(best["model"]) == set(baseline["best_model"])
            except Exception as e:  # noqa: BLE001
                lost += p.stat().st_size
                notes.append(f"{name}: {type(e).__name__}: {e}")
        return lost, 0, notes

    def final(baseline, now) -> int:
        import torch

        mismatch = 0
        if now.get("metrics") != baseline["metrics"]:
            mismatch += len(json.dumps(now.get("metrics")))
        if now.get("results") != baseline["results"]:
            mismatch += len(json.dumps(now.get("results"), default=str))
        a, b = baseline["best_model"], now.get("best_model", {})
        if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in a):
            mismatch += sum(v.numel() * v.element_size() for v in a.values())
        return mismatch

    def known() -> str | None:
        from midas_data.trainers import artifacts

        if not (out / "last.pt").exists():
            return None
        ck = artifacts.load_checkpoint(out / "last.pt")
        if not ck["epoch_done"] and ck["stream"]["offset"] >= ck["stream"]["num_samples"]:
            return (f"last.pt written after the last step of epoch {ck['epoch']} (offset "
                    f"{ck['stream']['offset']} of {ck['stream']['num_samples']}, epoch not done): "
                    "the resumed stream replays a whole epoch")
        return None

    return Stage("train --resume" + ("" if use_cli else " (python -m midas_data.trainers)"), run,
                 lambda: shutil.rmtree(out, ignore_errors=True), capture, check, final,
                 has_previous=False, temps=lambda: _temps(out, ".*.tmp"), known=known)


def _temps(d: Path, pattern: str) -> set[str]:
    return {p.name for p in d.glob(pattern)} if d.is_dir() else set()


def _diff_bytes(a: dict[str, bytes], b: dict[str, bytes]) -> int:
    """Bytes of files that differ, are missing, or are extra."""
    n = 0
    for name in set(a) | set(b):
        if a.get(name) != b.get(name):
            n += max(len(a.get(name, b"")), len(b.get(name, b"")))
    return n


def make_small_dataset(root: Path, per_class: int = 10) -> Path:
    """The tiny mfeat subset (fac + mor, 100 samples) the torch stages run on."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_samples
    from midas_data.pipelines import get_pipeline

    from midas_data import build_dataset

    src = get_pipeline("mfeat")(modalities=["fac", "mor"])
    build_dataset(tiny_samples(src, per_class), root, classes=src["classes"],
                  modalities=["fac", "mor"], shard_max_count=16, progress=False)
    return root


def exchange_supported(work: Path) -> bool:
    """Whether directories can be swapped atomically here (else a replaced dataset may be
    absent for an instant, which readers see as 'none', allowed but counted)."""
    from midas_data.atomic import _exchange

    a, b = work / ".xa", work / ".xb"
    a.mkdir(exist_ok=True)
    b.mkdir(exist_ok=True)
    try:
        return _exchange(a, b)
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)
