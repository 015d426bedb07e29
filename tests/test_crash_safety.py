"""Crash safety: SIGKILL every stage at seeded random moments (tests/crash_harness.py).

After each kill every reader must see the complete previous artifact, the complete new one,
or none (bytes lost must be zero); a rerun (`train --resume`) must finish; the final
artifacts must equal those of an uninterrupted run, byte for byte (metrics for training).

The kill tests carry the `crash` marker: a plain `pytest` leaves them out, `make test` (CI)
and `pytest -m crash` run them. They make 24 kills (6 per stage) on tiny data, each command
a forkserver child running the `midas-data` click command (a fresh interpreter spends
seconds importing torch, which every `midas-data` command does). The slow soak
(`pytest -m slow tests/test_crash_safety.py`, or MIDAS_SOAK=1) kills every stage many more
times (76), all as real `midas-data` processes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from crash_harness import (
    Launcher,
    build_stage,
    exchange_supported,
    extract_stage,
    make_small_dataset,
    mine_stage,
    torture,
    train_stage,
)

REPORTS: list = []


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def small(work) -> Path:
    """The tiny dataset of the torch stages, with features (so mining has an input)."""
    root = make_small_dataset(work / "small")
    from midas_data.features.extract import extract_features

    extract_features(root, warmup_epochs=1, feature_dim=16, progress=False, num_threads=1,
                     device="cpu")
    return root


@pytest.fixture(scope="module")
def forked(work) -> Launcher:
    launcher = Launcher("fork", work)
    launcher.warm_up()
    return launcher


def _check(rep, work: Path) -> None:
    REPORTS.append(rep)
    print("\n" + rep.line())
    assert rep.bytes_lost == 0, rep.notes[:10]
    assert rep.final_mismatch_bytes == 0, rep.line()
    if exchange_supported(work):
        assert rep.vanished == 0, rep.notes[:10]


@pytest.mark.crash
def test_kill_build_shards(work, forked):
    _check(torture(build_stage(work, "fork"), forked, kills=6, seed=1), work)


@pytest.mark.crash
def test_kill_extract(small, forked, work):
    _check(torture(extract_stage(small), forked, kills=6, seed=2), work)


@pytest.mark.crash
def test_kill_mine_misaligned(small, forked, work):
    pytest.importorskip("midas_data.mining.stage")
    pytest.importorskip("faiss")
    _check(torture(mine_stage(small), forked, kills=6, seed=3), work)


@pytest.mark.crash
def test_kill_train_resume(small, forked, work):
    _check(torture(train_stage(small, work), forked, kills=6, seed=4), work)


class _Killed(Exception):
    pass


def test_resume_from_a_checkpoint_after_an_epochs_last_step(small, tmp_path):
    """Regression: a checkpoint written right after an epoch's last step (stream offset ==
    num_samples, epoch bookkeeping not yet done) once resumed into an extra epoch. Stop right
    after the checkpoint of an epoch's last step (70 samples, batches of 16: step 5), resume, and
    compare with an uninterrupted run."""
    import torch
    from crash_harness import strip_times
    from midas_data.trainers import TrainConfig
    from midas_data.trainers.run import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig.from_preset("mfeat", epochs=2, warmup_epochs=1, batch_size=16,
                                      checkpoint_every=1, device="cpu")
        want = train(small, tmp_path / "a", cfg, progress=False, plots=False)

        def stop(step: int) -> None:
            if step == 5:
                raise _Killed

        with pytest.raises(_Killed):
            train(small, tmp_path / "b", cfg, progress=False, plots=False, on_step=stop)
        got = train(small, tmp_path / "b", cfg, resume=True, progress=False, plots=False)
    finally:
        torch.set_num_threads(threads)
    assert strip_times(got["test"]) == strip_times(want["test"])


@pytest.mark.crash
def test_summary():
    """Over the stages that ran: no byte lost or mismatched in any stage (none exempted), and
    the kills really interrupted writes. A harness whose kills all landed before or after a
    write would pass every per-stage check without testing atomicity; build-shards writes
    through most of its run (6 of its 6 kills landed mid-write when measured), so each
    build-shards report must show at least one."""
    if not REPORTS:
        pytest.skip("no stage ran")
    kills = sum(r.kills for r in REPORTS)
    mid_write = sum(r.killed_mid_write for r in REPORTS)
    known = sum(r.known_bug_states for r in REPORTS)
    lost = {r.stage: r.bytes_lost + r.final_mismatch_bytes for r in REPORTS}
    print(f"\ncrash safety: {kills} kills survived over {len(REPORTS)} stages ({mid_write} "
          f"mid-write, {known} in the state of the once-known resume bug), "
          f"{sum(lost.values())} bytes lost, {sum(r.seconds for r in REPORTS):.1f} s")
    assert sum(lost.values()) == 0, lost
    build = [r for r in REPORTS if r.stage.startswith("build-shards")]
    assert all(r.killed_mid_write > 0 for r in build), [r.line() for r in build]
    if len(REPORTS) == 4:
        assert kills >= 24


@pytest.mark.slow
@pytest.mark.crash
def test_soak_every_stage_as_real_processes(tmp_path, request):
    """Every stage as a fresh `midas-data` / `python -m midas_data.trainers` process, many kills
    (3 to 6 minutes on 2 cores). Runs when asked for: `pytest -m slow tests/test_crash_safety.py`,
    or with MIDAS_SOAK=1."""
    if "slow" not in (request.config.getoption("-m") or "").replace("not slow", "") \
            and not os.environ.get("MIDAS_SOAK"):
        pytest.skip("soak: select it with -m slow or MIDAS_SOAK=1")
    small = make_small_dataset(tmp_path / "small")
    launcher = Launcher("exec", tmp_path)
    stages = [(build_stage(tmp_path, "exec"), 30), (extract_stage(small), 16)]
    try:
        import faiss  # noqa: F401

        stages.append((mine_stage(small), 10))
    except ImportError:
        pass
    stages.append((train_stage(small, tmp_path), 20))
    total = 0
    for i, (stage, kills) in enumerate(stages):
        rep = torture(stage, launcher, kills=kills, seed=100 + i)
        _check(rep, tmp_path)
        total += rep.kills
    shutil.rmtree(tmp_path / "built", ignore_errors=True)
    print(f"\nsoak: {total} kills survived, 0 bytes lost")
