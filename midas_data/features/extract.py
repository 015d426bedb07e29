"""The `extract` stage: per-modality features and unimodal confidences for every split.

- `warmup`: train one UnimodalModel per modality (encoder + linear head, cross-entropy) on the
  train split, the MIDAS warm-up in isolation; write its encoder features and its softmax
  confidence at the true label p^m[y] for each split; save the models. An optimizer or lr
  not given is chosen per encoder (`warmup_plan`): Adam lr 1e-3 for the small encoders
  (mlp, small_cnn), the authors' SGD lr 1e-3 for ResNet-18 and other encoders.
- `user`: read features the user computed (Arrow, Parquet or .npz, keyed by sample key) and
  score them with cross-fitted linear probes. Train samples get out-of-fold confidences from
  K-fold probes fitted on the train split; the other splits get the mean of those K probes,
  so no confidence comes from a probe that saw its sample and no val/test label is used.

Output: `DATASET/features/{split}.arrow` (docs/CONTRACTS.md), rows in index order.
The reference warm-up holds each split's decoded inputs in memory (float32).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from midas_data.atomic import write_bytes_atomic
from midas_data.dataset.manifest import file_sha256
from midas_data.dataset.reader import Dataset, SplitReader, open_dataset
from midas_data.devices import check_device_available
from midas_data.diskspace import disk_full_guard
from midas_data.errors import MidasDataError, SchemaError, UnsafeInputError, where
from midas_data.features.config import ExtractConfig
from midas_data.features.encoders import (
    Standardize,
    UnimodalModel,
    build_encoder,
    default_encoder_for,
    embed,
    state_fingerprint,
    train_unimodal,
)
from midas_data.features.probe import crossfit_probes, ensemble_confidences
from midas_data.features.tables import Features, write_features
from midas_data.locking import output_lock
from midas_data.options import resolve_settings
from midas_data.progress import progress_bar as tqdm

MODELS_FILE = "warmup_models.pt"


def extract_features(dataset_dir: str | os.PathLike, config: ExtractConfig | None = None, *,
                     progress: bool = True, **settings: Any) -> dict:
    """Write `features/{split}.arrow` for the splits of the dataset at `dataset_dir`; return a summary.

    `config` holds the settings (`ExtractConfig`, whose field help says what each does); any
    of its fields may instead, or in addition, be given by name (`warmup_epochs=2`), so
    `extract_features(root, source="user", features_file=path)` works as before.
    `encoders` maps a modality to a registered encoder name or `{"name": ..., **kwargs}`
    (default: `default_encoder_for`). Deterministic for a seed on CPU with a fixed thread
    count (float sums depend on it; the default is 1 thread and the config records it).
    Splits the dataset does not have are skipped and listed in the summary.
    """
    cfg = resolve_settings(ExtractConfig, config, settings)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with output_lock(dataset_dir, "extract"):
            return _extract(dataset_dir, cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _extract(dataset_dir, cfg: ExtractConfig, progress: bool) -> dict:
    t0 = time.perf_counter()
    splits, source = cfg.splits, cfg.source
    ds = open_dataset(dataset_dir)
    todo = [s for s in splits if s in ds.splits]
    if not todo:
        raise MidasDataError(f"{where(file=ds.root / 'manifest.json', field='splits')}: none of "
                             f"{list(splits)} exist; the dataset has {ds.splits}")
    if "train" not in ds.splits:
        raise MidasDataError(f"{where(file=ds.root / 'manifest.json', field='splits')}: extract "
                             "fits on the train split, and the dataset has none")
    if source == "warmup":
        device = cfg.device
        check_device_available(device, "extract --device")
        dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        feats, confs, config, models = _warmup(ds, todo, cfg, dev, progress)
    else:
        if cfg.features_file is None:
            raise MidasDataError("source='user' needs features_file (Arrow, Parquet or .npz)")
        feats, confs, config = _user(ds, todo, Path(cfg.features_file), cfg.probe_folds, cfg.seed,
                                     cfg.probe_epochs, cfg.probe_l2, progress)
        models = None
    config["settings"] = cfg.to_dict()  # every setting of the run, as given

    out_dir = ds.root / "features"
    summary: dict = {"source": source, "dataset": str(ds.root), "modalities": ds.modalities,
                     "skipped_splits": [s for s in splits if s not in todo], "splits": {}}
    blob = None
    if models is not None:  # serialised in memory: a full disk is then our own, sized, error
        payload = {"format_version": 1, "dataset_fingerprint": ds.fingerprint,
                   "config": json.dumps(config, sort_keys=True), "models": models}
        buf = io.BytesIO()
        torch.save(payload, buf)
        blob = buf.getvalue()
    need = sum(a.nbytes for sp in todo for d in (feats[sp], confs[sp]) for a in d.values())
    with disk_full_guard("extract", out_dir, need=need + len(blob or b"")):
        for sp in todo:  # all splits are computed first: a failed run leaves the old tables
            sr = ds.split(sp)
            f = Features(list(sr.keys), sr.labels.copy(), feats[sp], confs[sp])
            path = out_dir / f"{sp}.arrow"
            fp = write_features(path, f, ds.fingerprint, source, config)
            summary["splits"][sp] = {"path": str(path), "rows": len(sr), "features_fingerprint": fp,
                                     "mean_conf": {m: float(confs[sp][m].mean()) for m in ds.modalities}}
        if blob is not None:
            write_bytes_atomic(out_dir / MODELS_FILE, blob)
            summary["models_path"] = str(out_dir / MODELS_FILE)
    summary["feature_dims"] = {m: int(feats[todo[0]][m].shape[1]) for m in ds.modalities}
    summary["config"] = config
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


# ---------------------------------------------------------------- warm-up
def _encoder_spec(ds: Dataset, m: str, encoders: dict) -> tuple[str, dict]:
    spec = ds.manifest["modalities"][m]
    choice = encoders.get(m)
    if choice is None:
        try:
            return default_encoder_for(spec["kind"], spec.get("shape")), {}
        except ValueError as e:
            raise MidasDataError(f"{where(file=ds.root / 'manifest.json', field=m)}: {e}") from e
    if isinstance(choice, str):
        return choice, {}
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        return choice["name"], {k: v for k, v in choice.items() if k != "name"}
    raise ValueError(f"encoders[{m!r}] must be an encoder name or {{'name': ..., **kwargs}}")


def warmup_plan(dataset: str | os.PathLike | Dataset, config: ExtractConfig | None = None,
                **settings: Any) -> tuple[dict[str, dict], str]:
    """What `extract_features` will warm up, before it does: per modality the encoder, the
    optimizer and the lr (`{"encoder": ..., "optimizer": ..., "lr": ...}`), and one line
    saying which optimizer and lr were chosen for the encoders and why ("" when both were
    given). Optimizer and lr not given are chosen per encoder (`ExtractConfig.warmup_settings`)."""
    cfg = resolve_settings(ExtractConfig, config, settings)
    ds = open_dataset(dataset)
    unknown = sorted(set(cfg.encoders) - set(ds.modalities))
    if unknown:
        raise ValueError(f"encoders given for unknown modalities {unknown}; the dataset has {ds.modalities}")
    specs = {m: _encoder_spec(ds, m, cfg.encoders) for m in ds.modalities}
    chosen, why = cfg.warmup_settings({m: name for m, (name, _) in specs.items()})
    return {m: {"encoder": specs[m][0], "optimizer": chosen[m][0], "lr": chosen[m][1]}
            for m in ds.modalities}, why


def _prepare(kind: str, values: list[np.ndarray]) -> torch.Tensor:
    """Decoded payloads of one modality as a float32 batch in the encoders' layout."""
    if kind == "audio":  # [channels, time] waveforms -> log-magnitude spectrogram [1, F, T]
        n = max(v.shape[-1] for v in values)
        wav = np.zeros((len(values), n), np.float32)
        for i, v in enumerate(values):
            wav[i, : v.shape[-1]] = v.reshape(-1, v.shape[-1]).mean(axis=0)
        spec = torch.stft(torch.from_numpy(wav), n_fft=512, hop_length=160,
                          window=torch.hann_window(512), return_complex=True)
        return torch.log1p(spec.abs()).unsqueeze(1).float()
    x = np.stack(values).astype(np.float32)
    x = x[:, None] if x.ndim == 1 else x  # scalars become 1-vectors
    if kind == "image":  # H x W x C uint8 -> C x H x W
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return torch.from_numpy(x)


def _load_split(ds: Dataset, sr: SplitReader, progress: bool) -> dict[str, torch.Tensor]:
    values: dict[str, list] = {m: [] for m in ds.modalities}
    for sample in tqdm(sr, total=len(sr), desc=f"read {sr.split}", unit="sample", disable=not progress):
        for m in ds.modalities:
            values[m].append(sample[m])
    return {m: _prepare(ds.manifest["modalities"][m]["kind"], v) for m, v in values.items()}


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature statistics for vectors, one scalar for images, spectrograms and clips."""
    dims = (0,) if x.dim() == 2 else tuple(range(x.dim()))
    mean, std = x.mean(dim=dims), x.std(dim=dims, unbiased=False)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def _sub_seed(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def _warmup(ds: Dataset, todo: list[str], cfg: ExtractConfig, device: torch.device, progress: bool):
    epochs, batch_size, seed, feature_dim = cfg.warmup_epochs, cfg.batch_size, cfg.seed, cfg.feature_dim
    plan, why = warmup_plan(ds, cfg)
    specs = {m: _encoder_spec(ds, m, cfg.encoders) for m in ds.modalities}
    for m in ds.modalities:
        if ds.manifest["modalities"][m]["kind"] == "text":
            raise MidasDataError(f"{where(file=ds.root / 'manifest.json', field=m)}: text cannot be "
                                 "warmed up by the built-in encoders; use source='user' with your features")
    train = ds.split("train")
    x_train = _load_split(ds, train, progress)
    y_train = torch.from_numpy(train.labels)
    num_classes = len(ds.classes)
    models, modules, fps, cfg_enc, history = {}, {}, {}, {}, {}
    for m in ds.modalities:
        name, kwargs = specs[m]
        mean, std = _stats(x_train[m])
        s = _sub_seed(seed, m)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            enc = build_encoder(name, tuple(x_train[m].shape[1:]), feature_dim, **kwargs)
            model = UnimodalModel(torch.nn.Sequential(Standardize(mean, std), enc), feature_dim, num_classes)
            history[m] = train_unimodal(x_train[m], y_train, model, epochs, batch_size,
                                        plan[m]["lr"], s, plan[m]["optimizer"], device,
                                        f"warm-up {m}", progress)
        models[m] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        fps[m] = state_fingerprint(models[m])
        cfg_enc[m] = {"name": name, "kwargs": kwargs, "input_shape": list(x_train[m].shape[1:]),
                      "optimizer": plan[m]["optimizer"], "lr": plan[m]["lr"],
                      "standardize": {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}}
        modules[m] = model
    feats: dict = {sp: {} for sp in todo}
    confs: dict = {sp: {} for sp in todo}
    for sp in todo:
        sr = ds.split(sp)
        x = x_train if sp == "train" else _load_split(ds, sr, progress)
        for m in ds.modalities:
            feats[sp][m], confs[sp][m] = embed(modules[m], x[m], sr.labels, 256, device)
    config = {"source": "warmup", "encoders": cfg_enc, "feature_dim": feature_dim, "epochs": epochs,
              "batch_size": batch_size, "seed": seed,
              # per modality; chosen per encoder when not given (`why` says which and why)
              "optimizer": {m: plan[m]["optimizer"] for m in ds.modalities},
              "lr": {m: plan[m]["lr"] for m in ds.modalities}, "warmup_choice": why,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": device.type,
              "model_fingerprint": fps,
              "model_fingerprint_all": hashlib.sha256("".join(fps[m] for m in ds.modalities).encode()).hexdigest(),
              "history": {m: history[m][-1] if history[m] else {} for m in ds.modalities}}
    return feats, confs, config, models


# ---------------------------------------------------------------- user features
def _column_matrix(col: pa.ChunkedArray | pa.Array, keys: list[str], file: Path, field: str) -> np.ndarray:
    """A list / fixed_size_list / numeric column as float32 [n, d], checked row by row."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise SchemaError(f"{where(file, keys[bad], field)}: value is null")
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 1)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        raise SchemaError(f"{where(file, None, field)}: expected a list of floats per row, got {col.type}")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise SchemaError(f"{where(file, keys[bad], field)}: {lengths[bad]} values, but row 0 "
                          f"({keys[0]!r}) has {lengths[0]}; every row needs the same dimension")
    flat = pc.list_flatten(col)
    if flat.null_count:
        raise SchemaError(f"{where(file, None, field)}: contains null values inside a row")
    d = int(lengths[0]) if len(lengths) else 0
    return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), d)


def load_user_features(path: str | os.PathLike, modalities: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read `key` and one feature matrix per modality (column `m` or `feat.m`) from a file."""
    path = Path(path)
    if not path.exists():
        raise MidasDataError(f"{where(file=path)}: features file not found")
    ext = path.suffix.lower()
    cols: dict[str, object]
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files}
        except ValueError as e:
            if "pickle" not in str(e):
                raise MidasDataError(f"{where(file=path)}: not a readable .npz file ({e})") from e
            raise UnsafeInputError(f"{where(file=path)}: cannot load without pickle ({e}); store keys "
                                   "as a str array (dtype '<U') and features as float arrays") from e
        except (OSError, EOFError, MemoryError, zipfile.BadZipFile) as e:  # a damaged or crafted zip
            raise MidasDataError(f"{where(file=path)}: not a readable .npz file ({e})") from e
    elif ext in (".arrow", ".feather", ".ipc", ".parquet"):
        try:
            if ext == ".parquet":
                import pyarrow.parquet as pq
                table = pq.read_table(path)
            else:
                with pa.memory_map(str(path), "r") as src:
                    try:
                        table = pa.ipc.open_file(src).read_all()
                    except pa.ArrowInvalid:  # an IPC stream rather than a file
                        src.seek(0)
                        table = pa.ipc.open_stream(src).read_all()
        except (pa.ArrowException, OSError) as e:
            raise MidasDataError(f"{where(file=path)}: not a readable {ext[1:]} file ({e})") from e
        cols = {n: table.column(n) for n in table.column_names}
    else:
        raise MidasDataError(f"{where(file=path)}: unsupported features file type {ext!r}; "
                             "use .arrow (IPC file), .parquet or .npz")
    if "key" not in cols:
        raise SchemaError(f"{where(file=path, field='key')}: column missing; found {sorted(cols)}")
    raw_keys = cols["key"]
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in
            (raw_keys.tolist() if isinstance(raw_keys, np.ndarray) else raw_keys.to_pylist())]
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise SchemaError(f"{where(path, k, 'key')}: duplicate key in features file")
        seen.add(k)
    feats = {}
    for m in modalities:
        name = m if m in cols else f"feat.{m}"
        if name not in cols:
            raise SchemaError(f"{where(file=path, field=m)}: modality missing (no column {m!r} or "
                              f"'feat.{m}'); found {sorted(cols)}")
        c = cols[name]
        if isinstance(c, np.ndarray):
            if c.dtype.kind not in "fiu" or c.shape[:1] != (len(keys),):
                raise SchemaError(f"{where(path, None, name)}: expected a numeric array with "
                                  f"{len(keys)} rows, got {c.dtype} {c.shape}")
            x = c.reshape(len(keys), -1).astype(np.float32)
        else:
            x = _column_matrix(c, keys, path, name)
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            raise SchemaError(f"{where(path, keys[bad[0]], name)}: NaN or inf in features "
                              f"({len(bad)} rows affected)")
        feats[m] = x
    return keys, feats


def _user(ds: Dataset, todo: list[str], path: Path, folds: int, seed: int, epochs: int, l2: float,
          progress: bool):
    keys, user = load_user_features(path, ds.modalities)
    row_of = {k: i for i, k in enumerate(keys)}
    known: set[str] = set()
    for sp in ds.splits:
        known.update(ds.split(sp).keys)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SchemaError(f"{where(path, unknown[0], 'key')}: not a sample of the dataset "
                          f"({len(unknown)} unknown keys); features must be keyed like the shards")
    rows = {}
    for sp in dict.fromkeys(["train", *todo]):
        sr = ds.split(sp)
        missing = [k for k in sr.keys if k not in row_of]
        if missing:
            raise SchemaError(f"{where(path, missing[0], 'key')}: {sp} sample has no features "
                              f"({len(missing)} of {len(sr)} {sp} keys missing)")
        rows[sp] = np.array([row_of[k] for k in sr.keys], dtype=np.int64)
    feats: dict = {sp: {m: user[m][rows[sp]] for m in ds.modalities} for sp in todo}
    confs: dict = {sp: {} for sp in todo}
    y_train = ds.split("train").labels
    for m in tqdm(ds.modalities, desc="cross-fit probes", disable=not progress):
        conf, probes = crossfit_probes(user[m][rows["train"]], y_train, len(ds.classes), folds, seed, epochs, l2)
        for sp in todo:
            confs[sp][m] = conf if sp == "train" else ensemble_confidences(
                probes, feats[sp][m], ds.split(sp).labels)
    config = {"source": "user", "features_file": str(path), "features_file_sha256": file_sha256(path),
              "probe": {"kind": "multinomial logistic regression, L-BFGS, standardised",
                        "folds": folds, "seed": seed, "epochs": epochs, "l2": l2,
                        "train": "out-of-fold", "other splits": "mean of the fold probes"}}
    return feats, confs, config

