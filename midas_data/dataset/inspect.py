"""`midas-data inspect`: a human-readable summary of a dataset, optionally verified."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from midas_data.dataset.reader import Dataset, open_dataset
from midas_data.errors import MidasDataError, where


def describe(path: str | Path, verify: bool = False) -> tuple[str, list[str]]:
    """Return (report text, problems). Problems are non-empty only with verify=True."""
    ds = open_dataset(path)
    m = ds.manifest
    lines = [f"dataset {getattr(ds, 'url', ds.root)}  (format v{m['format_version']}, fingerprint {ds.fingerprint[:16]})",
             f"source: {m.get('source', {})}", "modalities:"]
    for name in ds.modalities:
        spec = ds.schema[name]
        lines.append(f"  {name:<12} kind={spec['kind']:<6} ext=.{spec['ext']:<4} dtype={spec['dtype']} "
                     f"shape={spec['shape']}")
    lines.append(f"classes ({len(ds.classes)}): {', '.join(ds.classes[:20])}"
                 + (" ..." if len(ds.classes) > 20 else ""))
    for split in ds.splits:
        sr = ds.split(split)
        counts = Counter(sr.labels.tolist())
        per_class = " ".join(f"{ds.classes[c]}:{counts[c]}" for c in sorted(counts))
        shards = m["splits"][split]["shards"]
        lines.append(f"split {split:<5} {len(sr):>8} samples in {len(shards)} shard(s); per class {per_class}")
    total = sum(s["bytes"] for s in m["shards"])
    lines.append(f"{len(m['shards'])} shards, {total / 1e6:.2f} MB")
    for extra in ("features", "pairs"):
        if (ds.root / extra).exists():
            lines.append(f"{extra}/: {sorted(p.name for p in (ds.root / extra).iterdir())}")
    problems: list[str] = []
    if verify:
        problems = ds.verify() + verify_derived(ds)
        lines.append("verify: OK, every shard matches its size and sha256, features and pairs "
                     "their checksums" if not problems else f"verify: {len(problems)} problem(s)")
        lines.extend("  " + p for p in problems)
    return "\n".join(lines), problems


def verify_derived(ds: Dataset) -> list[str]:
    """Check the features tables and mined pairs of every split the way a reader opens them
    (values against their own checksums, fingerprints against the dataset and features,
    rows against the index keys); return the problems found."""
    from midas_data.features.tables import read_features
    from midas_data.mining.pairs import pairs_dir, read_pairs

    problems = []
    for split in ds.splits:
        feat_path = ds.root / "features" / f"{split}.arrow"
        fp = None
        if feat_path.exists():
            try:
                f = read_features(feat_path, ds.fingerprint)
                if f.keys != ds.split(split).keys:
                    raise MidasDataError(f"{where(file=feat_path, field='key')}: rows do not "
                                         "match the split's index; rerun `midas-data extract`")
                fp = f.fingerprint
            except MidasDataError as e:
                problems.append(str(e))
                continue
        if pairs_dir(ds.root, split).is_dir():
            try:
                read_pairs(ds.root, split, fp, keys=ds.split(split).keys)
            except MidasDataError as e:
                problems.append(str(e))
    return problems
