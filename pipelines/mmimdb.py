"""MM-IMDB (Arevalo et al. 2017): 25,959 movies, poster image + plot text, 23 genres.

Expected on-disk layout (`root`, the MM-IMDB release):
```
root/dataset/<id>.jpeg     poster
root/dataset/<id>.json     metadata: "plot" (a list of plot texts, or a string), "genres"
root/split.json            {"train": [ids], "dev": [ids], "test": [ids]}
```
MM-IMDB is multi-label; MIDAS needs one label per sample (a misaligned sample mixes the
one-hot labels of its two sources), so the reader makes a single-label variant, chosen by
`label_policy`:
- `exclusive` (default): keep movies with exactly one genre among `genres` (default: the 8
  most frequent: Drama, Comedy, Romance, Thriller, Crime, Action, Adventure, Horror) and
  label them with it. Clean labels; fewer movies.
- `priority`: label each movie with the first genre of `genres` that it has (default order:
  the same 8, rarest first, so the frequent Drama and Comedy do not swallow the rest).
Movies without a usable genre are dropped and counted in `source["label_policy_dropped"]`.

Modalities: `image` uint8 `[3, image_size, image_size]`; `text` (the first plot, or all plots
joined with `plot="all"`) as `.txt` or, with `text_format="bytes"`, uint8 bytes `[text_len]`.
"""

from __future__ import annotations

import json
from pathlib import Path

from midas_data.dataset.shards import Sample
from midas_data.errors import MidasDataError, SchemaError, where

from .common import (
    BadInput,
    PayloadStore,
    authors_recipe,
    check_modalities,
    check_options,
    output,
    safe_key,
    split_name,
)
from .food101 import TEXT_FORMATS, text_payload
from .media import image_chw

MODALITIES = ("image", "text")
GENRES = ["Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
          "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
          "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir"]
TOP_GENRES = GENRES[:8]  # by frequency in MM-IMDB, most frequent first
POLICIES = ("exclusive", "priority")
# The paper reports no MM-IMDB run: the Food-101 settings (docs/METHOD.md, "Authors' settings"),
# the other image-text set.
RECIPE = authors_recipe(lr=1e-3, epochs=30, step_size=15,
                        warmup_epochs=2, lam=1.0)


def single_label(movie_genres: list[str], policy: str, genres: list[str]) -> str | None:
    """The one label of a movie under `policy`, or None when it has no usable genre."""
    have = [g for g in genres if g in set(movie_genres)]
    if policy == "exclusive":
        return have[0] if len(have) == 1 else None
    return have[0] if have else None


def _load_json(path: Path, key: str) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SchemaError(f"{where(path, key, 'text')}: metadata file does not exist (modality "
                          "and label missing)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"{where(path, key, 'text')}: unreadable metadata JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("genres"), list):
        raise SchemaError(f"{where(path, key, 'genres')}: expected a JSON object with a genre list")
    return meta


def read_mmimdb(root: str | Path, modalities: list[str] | None = None, skip_bad: bool = False, *,
                label_policy: str = "exclusive", genres: list[str] | None = None,
                image_size: int = 224, text_format: str = "txt", text_len: int = 512,
                plot: str = "first", cache_dir: str | Path | None = None) -> dict:
    """MM-IMDB movies as single-label samples with `image` and `text` payloads."""
    options = {k: v for k, v in locals().items() if k not in ("root", "modalities", "skip_bad")}
    check_options("mmimdb", options)
    root = Path(root)
    mods = check_modalities(modalities, MODALITIES, "mmimdb")
    if label_policy not in POLICIES or text_format not in TEXT_FORMATS or plot not in ("first", "all"):
        raise ValueError(f"label_policy must be one of {POLICIES}, text_format one of "
                         f"{TEXT_FORMATS}, plot 'first' or 'all'")
    genres = list(genres) if genres else (TOP_GENRES if label_policy == "exclusive"
                                          else TOP_GENRES[::-1])
    unknown = [g for g in genres if g not in GENRES]
    if unknown:
        raise ValueError(f"mmimdb: unknown genre {unknown[0]!r}; MM-IMDB genres are {GENRES}")
    split_file = root / "split.json"
    try:
        splits = json.loads(split_file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise MidasDataError(f"{where(file=split_file)}: split file does not exist") from e
    except (OSError, ValueError) as e:
        raise SchemaError(f"{where(file=split_file)}: unreadable split JSON ({e})") from e
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise SchemaError(f"{where(file=split_file)}: expected {{split: [ids]}}")
    bad, store, dropped = BadInput(skip_bad), PayloadStore(cache_dir), 0
    items = [(split_name(sp, split_file), str(i)) for sp, ids in splits.items() for i in ids]

    def one(item: tuple[str, str]) -> Sample | None:
        nonlocal dropped
        split, mid = item
        key, base = safe_key(mid), root / "dataset" / mid
        meta = _load_json(base.with_suffix(".json"), key)
        label = single_label([str(g) for g in meta["genres"]], label_policy, genres)
        if label is None:
            dropped += 1
            return None
        payloads = {}
        if "image" in mods:
            img = next((p for p in (base.with_suffix(".jpeg"), base.with_suffix(".jpg"))
                        if p.exists()), base.with_suffix(".jpeg"))
            payloads["image"] = store.put(key, "image", image_chw(img, image_size, key, "image"))
        if "text" in mods:
            plots = meta.get("plot")
            plots = [plots] if isinstance(plots, str) else plots
            if not plots or not all(isinstance(p, str) for p in plots):
                raise SchemaError(f"{where(base.with_suffix('.json'), key, 'text')}: no plot text "
                                  "(modality missing)")
            text = plots[0] if plot == "first" else " ".join(plots)
            payloads["text"] = text_payload(store, key, text, text_format, text_len)
        return Sample(key=key, label=label, payloads=payloads, split=split, source=str(split_file))

    samples = bad.run(items, one, key_of=lambda it: it[1])
    out = output("mmimdb", samples, genres, mods, bad, options, root)
    out["source"].update(label_policy_dropped=dropped, text_spill_dir=store.spilled)
    return out
