"""Part `extract`: the `extract` stage's warm-up (one ResNet-18 (--encoder) + linear head per modality,
trained on the train split, then features and confidences for every split) on the GPU, on
the fixture the training part built (built here if that part did not run)."""

from __future__ import annotations

import time
from pathlib import Path

from .fixture import build_fixture
from .harness import Report


def part_extract(a, rep: Report) -> None:
    import torch

    from midas_data.dataset.reader import open_dataset
    from midas_data.features.extract import extract_features

    dev = torch.device(a.device)
    root = Path(a.work) / "cremad_like"
    rep.phase("fixture")
    build_fixture(root, a.clips, a.frames, a.frame_size, a.n_mels, a.audio_frames, a.seed, rep.log)
    ds = open_dataset(root)
    n = {s: len(ds.split(s)) for s in ds.splits}
    rep.set("config", {"device": str(dev), "warmup_epochs": a.extract_epochs,
                       "batch_size": a.batch_size, "encoder": a.encoder,
                       "rows": n})
    rep.phase("extract")
    t = time.perf_counter()
    summary = extract_features(root, source="warmup", warmup_epochs=a.extract_epochs,
                               batch_size=a.batch_size, device=str(dev), progress=False,
                               encoders={"audio": a.encoder, "visual": a.encoder})
    wall = time.perf_counter() - t
    trained = a.extract_epochs * n["train"] * len(ds.modalities)
    rep.set("extract", {"wall_s": wall, "seconds_reported": summary.get("seconds"),
                        "trained_samples_per_s": trained / wall,  # epochs x train rows x modalities / wall
                        "feature_dims": summary.get("feature_dims"),
                        "mean_conf": {s: v["mean_conf"] for s, v in summary["splits"].items()}})
    rep.log(f"extract warm-up: {wall:.1f} s for {a.extract_epochs} epochs x {n['train']} train "
            f"clips x {len(ds.modalities)} modalities, then features of {sum(n.values())} rows")
    rep.set("status", "ok")
