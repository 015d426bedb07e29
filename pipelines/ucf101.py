"""UCF-101 (Soomro et al. 2012): 13,320 clips, 101 actions, RGB frames + stacked optical flow.

Expected on-disk layout (`root`; the official split lists and the frame / TV-L1 flow folders
of the usual two-stream preprocessing):
```
root/ucfTrainTestlist/classInd.txt       `1 ApplyEyeMakeup` (1-based index, class name)
root/ucfTrainTestlist/trainlist01.txt    `ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1`
root/ucfTrainTestlist/testlist01.txt     `ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi`
root/jpegs_256/v_ApplyEyeMakeup_g08_c01/frame000001.jpg        RGB frames (`rgb_dir`)
root/tvl1_flow/u/v_ApplyEyeMakeup_g08_c01/frame000001.jpg      x flow (`flow_dir`/`flow_x`)
root/tvl1_flow/v/v_ApplyEyeMakeup_g08_c01/frame000001.jpg      y flow (`flow_dir`/`flow_y`)
```
The list files may also sit directly in `root`. `split_id` picks lists 01..03. A stratified
`val_fraction` of the train list becomes val.

Modalities: `rgb`, uint8 `[num_frames, 3, frame_size, frame_size]` uniformly sampled; `flow`,
uint8 `[num_frames, 2 * flow_stack, frame_size, frame_size]`: at `num_frames` uniformly spaced
positions, `flow_stack` consecutive x/y flow frames interleaved (x_t, y_t, x_t+1, y_t+1, ...).
"""

from __future__ import annotations

from pathlib import Path

from midas_data.dataset.shards import Sample
from midas_data.errors import MidasDataError, SchemaError, where

from .common import (
    BadInput,
    PayloadStore,
    authors_recipe,
    carve_val,
    check_modalities,
    check_options,
    output,
    read_rows,
    safe_key,
)
from .media import load_flow, load_frames

MODALITIES = ("rgb", "flow")
RECIPE = authors_recipe(lr=1e-2, epochs=70, step_size=50,
                        warmup_epochs=0, lam=1.0)


def _lists_dir(root: Path, lists_dir: str) -> Path:
    for d in (root / lists_dir, root):
        if (d / "classInd.txt").is_file():
            return d
    raise MidasDataError(f"{where(file=root / lists_dir / 'classInd.txt')}: UCF-101 class list not "
                         "found (also looked in root); pass lists_dir=...")


def read_ucf101(root: str | Path, modalities: list[str] | None = None, skip_bad: bool = False, *,
                split_id: int = 1, num_frames: int = 3, flow_stack: int = 5, frame_size: int = 224,
                rgb_dir: str = "jpegs_256", flow_dir: str = "tvl1_flow", flow_x: str = "u",
                flow_y: str = "v", lists_dir: str = "ucfTrainTestlist", val_fraction: float = 0.1,
                seed: int = 0, allow_short: bool = False, frame_layout: str = "tchw",
                cache_dir: str | Path | None = None) -> dict:
    """UCF-101 clips of split `split_id` as samples with `rgb` and `flow` payloads."""
    options = {k: v for k, v in locals().items() if k not in ("root", "modalities", "skip_bad")}
    check_options("ucf101", options)
    root = Path(root)
    mods = check_modalities(modalities, MODALITIES, "ucf101")
    bad, store = BadInput(skip_bad), PayloadStore(cache_dir)
    lists = _lists_dir(root, lists_dir)
    class_file = lists / "classInd.txt"
    classes: list[str] = []
    for i, r in enumerate(read_rows(class_file, 2, 2)):
        if r[0] != str(i + 1):
            raise SchemaError(f"{where(class_file, f'line {i + 1}')}: expected index {i + 1}, got {r[0]!r}")
        classes.append(r[1])
    entries: dict[str, tuple[str, str, Path]] = {}  # clip -> (split, class, list file)
    for split, stem in (("train", "trainlist"), ("test", "testlist")):
        path = lists / f"{stem}{split_id:02d}.txt"
        for r in read_rows(path, 1, 2):
            clip = Path(r[0]).stem
            folder = r[0].replace("\\", "/").split("/")[0] if "/" in r[0] else None
            cls = folder or (classes[int(r[1]) - 1] if len(r) > 1 and r[1].isdigit()
                             and 0 < int(r[1]) <= len(classes) else None)
            if cls not in classes:
                bad.fail(path, clip, "label", f"unknown class {cls!r}; classInd.txt lists "
                         f"{len(classes)} classes")
                continue
            if len(r) > 1 and r[1].isdigit() and classes[int(r[1]) - 1:int(r[1])] != [cls]:
                bad.fail(path, clip, "label", f"index {r[1]} disagrees with class folder {cls!r}")
                continue
            if clip in entries:
                bad.fail(path, clip, "split", f"listed twice (also in {entries[clip][2]})")
                continue
            entries[clip] = (split, cls, path)
    rgb_root, flow_root = root / rgb_dir, root / flow_dir

    def one(clip: str) -> Sample:
        split, cls, path = entries[clip]
        key = safe_key(clip)
        payloads = {}
        if "rgb" in mods:
            payloads["rgb"] = store.put(key, "rgb", load_frames(
                rgb_root / clip, num_frames, frame_size, clip, "rgb", allow_short, frame_layout))
        if "flow" in mods:
            payloads["flow"] = store.put(key, "flow", load_flow(
                flow_root / flow_x / clip, flow_root / flow_y / clip, num_frames, flow_stack,
                frame_size, clip, "flow", allow_short, frame_layout))
        return Sample(key=key, label=cls, payloads=payloads, split=split, source=str(path))

    samples = bad.run(sorted(entries), one)
    carve_val(samples, [classes.index(str(s.label)) for s in samples], val_fraction, seed)
    return output("ucf101", samples, classes, mods, bad, options, root)
