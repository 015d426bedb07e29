"""The `midas-data` command line. Each command is a thin shell around a library function.

This is the top layer: it may import the library (dataset, features, mining, stream, loss),
the dataset readers (midas_data.pipelines) and the reference trainer (midas_data.trainers);
none of those imports this module, and the library imports neither readers nor trainer.
The options of `extract` and `mine-misaligned` are generated from `ExtractConfig` and
`MineConfig` (`train`'s from `TrainConfig`), so their defaults and help live there.
"""

from __future__ import annotations

import json
import os
import sys

import click

from midas_data.errors import USER_ERRORS, MidasDataError
from midas_data.features.config import ExtractConfig
from midas_data.mining.config import MineConfig
from midas_data.options import click_options, config_from_options
from midas_data.storage.click_types import DATASET_ROOT


def _fail(e: Exception) -> None:
    click.echo(f"error: {_one_line(e)}", err=True)
    sys.exit(2)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


def _parse_options(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        k, v = pair.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


_READER_ARGS = {"root", "modalities", "skip_bad", "manifest", "classes", "allow_outside_paths"}


def _check_reader_options(reader, name: str, opts: dict) -> None:
    """Refuse --option names the reader does not take, listing the ones it does."""
    import inspect

    params = inspect.signature(reader).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return  # the reader checks its own options
    accepted = sorted(p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                      inspect.Parameter.POSITIONAL_OR_KEYWORD) and p.name not in _READER_ARGS)
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise click.BadParameter(
            f"pipeline {name!r} has no option {unknown[0]!r}; it accepts "
            f"{', '.join(accepted) if accepted else 'no --option at all'}", param_hint="--option")


class _LazyGroup(click.Group):
    """Resolves `train` (the reference trainer, midas_data.trainers) only when asked for, so
    that `midas-data --version` and the data commands do not pay for importing the trainer."""

    lazy = {"train": "midas_data.trainers.run:main",
            "index-shards": "midas_data.dataset.index_shards:index_shards_cmd"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def invoke(self, ctx: click.Context):
        """Bad input and broken files end as one line `error: ...` and exit status 2; the
        traceback only with --debug."""
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if (ctx.obj or {}).get("debug"):
                raise
            _fail(e)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup)
@click.version_option(package_name="midas-data")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """MIDAS misaligned-sample augmentation as a data pipeline."""
    ctx.ensure_object(dict)["debug"] = debug


@main.command("build-shards")
@click.option("--pipeline", "pipeline_name", default="mfeat", show_default=True,
              help="Reader for the source: mfeat (bundled real default), av_digits, or any registered.")
@click.option("--manifest", "manifest_file", type=click.Path(dir_okay=False),
              help="A CSV/JSONL/Parquet manifest of your own data (implies --pipeline manifest).")
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="Source folder for on-disk pipelines (cremad, ucf101, food101, ...).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Pipeline option, repeatable; VALUE is read as JSON when it parses.")
@click.option("--skip-bad", is_flag=True,
              help="Skip unreadable or incomplete samples and list them in the manifest.")
@click.option("--modalities", help="Comma-separated modality names (mfeat default: fac,mor).")
@click.option("--classes", help="Comma-separated class names, in index order (default: inferred).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output dataset directory.")
@click.option("--shard-samples", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Max samples per shard.")
@click.option("--shard-mb", default=256.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Max MB per shard.")
@click.option("--split-seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed of the stratified 70/10/20 split.")
@click.option("--allow-outside-paths", is_flag=True,
              help="--manifest: accept payload paths outside the manifest's folder (absolute, "
                   "'..', or symlinks leading out).")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build_shards_cmd(pipeline_name, manifest_file, root, options, skip_bad, modalities, classes, out_dir, shard_samples,
                     shard_mb, split_seed, allow_outside_paths, overwrite, quiet) -> None:
    """Turn a dataset into WebDataset shards plus Arrow indexes."""
    from midas_data.dataset.shards import build_dataset
    from midas_data.pipelines import get_pipeline
    from midas_data.storage.publish import staged

    mods = modalities.split(",") if modalities else None
    class_list = classes.split(",") if classes else None
    opts = _parse_options(options)
    try:
        if manifest_file:
            reader = get_pipeline("manifest")
            _check_reader_options(reader, "manifest", opts)
            src = reader(manifest_file, modalities=mods, classes=class_list,
                         allow_outside_paths=allow_outside_paths, **opts)
        else:
            reader = get_pipeline(pipeline_name)
            _check_reader_options(reader, pipeline_name, opts)
            if root:
                src = reader(root, modalities=mods, skip_bad=skip_bad, **opts)
            else:
                src = reader(modalities=mods, **opts)
    except KeyError as e:  # an unknown pipeline name
        _fail(MidasDataError(e.args[0] if e.args else str(e)))
    with staged(out_dir, overwrite=overwrite) as dest:  # a URL: built here, uploaded
        m = build_dataset(src["samples"], dest, classes=class_list or src.get("classes"),
                          modalities=src["modalities"], shard_max_count=shard_samples,
                          shard_max_mb=shard_mb, split_seed=split_seed, overwrite=overwrite,
                          source=src.get("source"), progress=not quiet)
    counts = ", ".join(f"{k}={v['count']}" for k, v in m["splits"].items())
    click.echo(f"wrote {out_dir}: {len(m['shards'])} shard(s), {counts}, modalities {m['modality_order']}")


@main.command("inspect")
@click.argument("dataset", type=DATASET_ROOT)
@click.option("--verify", is_flag=True, help="Check every shard's size and sha256.")
def inspect_cmd(dataset, verify) -> None:
    """Show schema, counts per split and class; --verify checks checksums."""
    from midas_data.dataset.inspect import describe

    text, problems = describe(dataset, verify=verify)
    click.echo(text)
    if problems:
        sys.exit(1)


@main.command("extract")
@click.argument("dataset", type=DATASET_ROOT)
@click_options(ExtractConfig)
@click.option("--quiet", is_flag=True)
def extract_cmd(dataset, quiet, **options) -> None:
    """Per-modality features and unimodal confidences for every sample."""
    from midas_data.features.extract import extract_features, warmup_plan
    from midas_data.storage.publish import remote_stage

    config = config_from_options(ExtractConfig, options)
    config = config.replace(source="user" if config.features_file else "warmup")
    with remote_stage(dataset, ("features",)) as target:  # a URL: features uploaded after
        if config.source == "warmup":
            _, why = warmup_plan(target, config)
            if why:  # optimizer or lr not given: say what fits the encoders, and why
                click.echo(why)
        summary = extract_features(target, config, progress=not quiet)
    for split, info in summary.get("splits", {}).items():
        conf = " ".join(f"{m}={c:.3f}" for m, c in info["mean_conf"].items())
        click.echo(f"features/{split}.arrow: {info['rows']} rows, mean confidence {conf}, "
                   f"fingerprint {info['features_fingerprint'][:12]}")


@main.command("mine-misaligned")
@click.argument("dataset", type=DATASET_ROOT)
@click_options(MineConfig)
@click.option("--quiet", is_flag=True)
def mine_cmd(dataset, quiet, **options) -> None:
    """FAISS k-NN partners with a different label, per modality, into DATASET/pairs/."""
    from midas_data.mining.stage import mine_misaligned
    from midas_data.storage.publish import remote_stage

    with remote_stage(dataset, ("pairs",)) as ds:  # a URL: pairs uploaded after
        root = ds if isinstance(ds, (str, os.PathLike)) else ds.root  # (Path.root is "/")
        summary = mine_misaligned(root, config_from_options(MineConfig, options),
                                  progress=not quiet)
    click.echo(json.dumps(summary, indent=2, default=str))


@main.command("demo")
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--modalities", default="fac,mor", show_default=True,
              help="Two or more UCI Multiple Features views (fac, pix, kar, fou, zer, mor).")
@click.option("--epochs", default=60, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--quiet", is_flag=True)
def demo_cmd(out, modalities, epochs, seed, quiet) -> None:
    """The whole pipeline on the bundled real dataset, then Joint vs MIDAS on test."""
    import torch

    from midas_data.trainers.demo import run_demo

    torch.set_num_threads(1)  # tiny MLPs: one thread is faster and reproducible
    run_demo(out, tuple(modalities.split(",")), epochs=epochs, seed=seed, quiet=quiet)


if __name__ == "__main__":
    main()
