"""Each dataset reader builds shards from a fixture in the dataset's real on-disk layout."""

from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest
from midas_data.pipelines import PIPELINES, fixtures, get_pipeline

from midas_data import build_dataset, open_dataset

# name -> (fixture generator, reader options for tiny payloads, expected modality shapes)
CASES = {
    "cremad": (fixtures.make_cremad, {"n_mels": 16, "audio_frames": 20, "num_frames": 2,
                                      "frame_size": 8},
               {"audio": [1, 16, 20], "visual": [2, 3, 8, 8]}),
    "kinetics_sounds": (fixtures.make_kinetics_sounds, {"n_mels": 16, "audio_frames": 20,
                                                        "num_frames": 2, "frame_size": 8},
                        {"audio": [1, 16, 20], "visual": [2, 3, 8, 8]}),
    "ucf101": (fixtures.make_ucf101, {"num_frames": 2, "flow_stack": 2, "frame_size": 8},
               {"rgb": [2, 3, 8, 8], "flow": [2, 4, 8, 8]}),
    "food101": (fixtures.make_food101, {"image_size": 8}, {"image": [3, 8, 8], "text": None}),
    "cmu_mosi": (fixtures.make_cmu_mosi, {}, {"text": [12], "audio": [6], "video": [8]}),
    "cmu_mosei": (fixtures.make_cmu_mosi, {}, {"text": [12], "audio": [6], "video": [8]}),
    "mmimdb": (fixtures.make_mmimdb, {"image_size": 8}, {"image": [3, 8, 8], "text": None}),
}


def build(src: dict, out) -> dict:
    return build_dataset(src["samples"], out, classes=src["classes"], modalities=src["modalities"],
                         source=src["source"], progress=False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_builds_shards_from_its_layout(name, tmp_path):
    make, opts, shapes = CASES[name]
    root = make(tmp_path / "raw")
    reader = get_pipeline(name)
    params = list(inspect.signature(reader).parameters)
    assert params[:3] == ["root", "modalities", "skip_bad"]
    src = reader(root, **opts)
    m = build(src, tmp_path / "ds")
    assert m["modality_order"] == list(shapes)
    for mod, shape in shapes.items():
        assert m["modalities"][mod]["shape"] == shape
        assert m["modalities"][mod]["kind"] == ("text" if shape is None else "tensor")
    assert m["source"]["pipeline"] == name and m["source"]["skipped_count"] == 0
    ds = open_dataset(tmp_path / "ds")
    total = sum(len(ds.split(s)) for s in ds.splits)
    assert total == len(src["samples"]) > 0
    sample = ds.split("train").get(0)
    for mod, shape in shapes.items():
        v = sample[mod]
        assert isinstance(v, str) if shape is None else list(v.shape) == shape


def test_registry_lists_every_reader():
    for name in CASES:
        assert name in PIPELINES and callable(get_pipeline(name))


def test_recipes_carry_the_authors_settings():
    from midas_data.pipelines import cremad, food101, kinetics_sounds, ucf101

    design = {cremad: (1e-3, 70, 50, 10, 1.0), kinetics_sounds: (1e-3, 70, 50, 10, 5.0),
              ucf101: (1e-2, 70, 50, 0, 1.0), food101: (1e-3, 30, 15, 2, 1.0)}
    for mod, (lr, epochs, step, warm, lam) in design.items():
        r = mod.RECIPE
        assert (r["lr"], r["epochs"], r["step_size"], r["warmup_epochs"], r["lam"]) == (lr, epochs, step, warm, lam)
        assert (r["optimizer"], r["momentum"], r["weight_decay"], r["batch_size"], r["gamma"]) == \
            ("sgd", 0.9, 1e-4, 64, 0.1)
    try:
        from midas_data.trainers.config import PAPER_PRESETS, TrainConfig
    except ImportError:
        return
    for mod, preset in ((cremad, "cremad"), (kinetics_sounds, "kinetics_sounds"), (ucf101, "ucf101"),
                        (food101, "food101")):
        TrainConfig.from_dict(dict(mod.RECIPE))  # every key is a TrainConfig field
        if preset in PAPER_PRESETS:
            shared = set(mod.RECIPE) & set(PAPER_PRESETS[preset])
            assert {k: mod.RECIPE[k] for k in shared} == {k: PAPER_PRESETS[preset][k] for k in shared}


def test_cremad_labels_split_lists_and_val(tmp_path):
    root = fixtures.make_cremad(tmp_path / "raw", per_class=4, split_lists=True)
    src = get_pipeline("cremad")(root, n_mels=32, audio_frames=10, num_frames=2, frame_size=4,
                                 val_fraction=0.34)
    by_key = {s.key: s for s in src["samples"]}
    assert len(by_key) == 24 and all(s.label == k.split("_")[2] for k, s in by_key.items())
    splits = [s.split for s in src["samples"]]
    assert splits.count("test") == 6 and splits.count("val") == 6 and splits.count("train") == 12
    # the audio of each class is a tone: a distinct loudest band per class
    peak = {s.label: int(np.argmax(s.payloads["audio"][0].mean(axis=1))) for s in src["samples"]}
    assert len(set(peak.values())) == 6


def test_cache_dir_layout_and_modality_subset(tmp_path):
    root = fixtures.make_cremad(tmp_path / "raw", per_class=2)
    opts = {"n_mels": 8, "audio_frames": 10, "num_frames": 2, "frame_size": 4}
    mem = get_pipeline("cremad")(root, **opts)
    disk = get_pipeline("cremad")(root, cache_dir=tmp_path / "cache", frame_layout="thwc", **opts)
    a, b = mem["samples"][0], disk["samples"][0]
    assert str(b.payloads["audio"]).endswith(".audio.npy")
    np.testing.assert_array_equal(np.load(b.payloads["audio"]), a.payloads["audio"])
    np.testing.assert_array_equal(np.load(b.payloads["visual"]), a.payloads["visual"].transpose(0, 2, 3, 1))
    m = build(disk, tmp_path / "ds")
    assert m["modalities"]["visual"]["shape"] == [2, 4, 4, 3]
    with pytest.raises(ValueError, match="at least 2"):
        get_pipeline("cremad")(root, modalities=["audio"])
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        get_pipeline("cremad")(root, modalities=["audio", "video"])


def test_ucf101_flow_interleaves_x_and_y(tmp_path):
    root = fixtures.make_ucf101(tmp_path / "raw", train_per_class=1, test_per_class=1, frames=5)
    for axis, value in (("u", 30), ("v", 220)):
        for f in (root / "tvl1_flow" / axis / "v_Archery_g01_c01").iterdir():
            fixtures.write_jpg(f, np.full((8, 8), value, np.uint8))
    src = get_pipeline("ucf101")(root, num_frames=2, flow_stack=3, frame_size=4, val_fraction=0)
    s = next(s for s in src["samples"] if s.key == "v_Archery_g01_c01")
    assert s.label == "Archery" and s.split == "train" and s.payloads["flow"].shape == (2, 6, 4, 4)
    means = s.payloads["flow"].mean(axis=(0, 2, 3))
    assert np.all(np.abs(means[0::2] - 30) < 3) and np.all(np.abs(means[1::2] - 220) < 3)
    assert src["classes"] == list(fixtures.UCF_CLASSES)
    assert {x.split for x in src["samples"]} == {"train", "test"}


def test_food101_text_formats_and_ambiguous_text(tmp_path):
    root = fixtures.make_food101(tmp_path / "raw", train_per_class=2, test_per_class=1)
    csv_path = root / "texts" / "train_titles.csv"
    csv_path.write_text(csv_path.read_text().replace("serves 2", "see photo.jpg", 1))
    src = get_pipeline("food101")(root, image_size=4)
    texts = [s.payloads["text"] for s in src["samples"]]
    spilled = [t for t in texts if not isinstance(t, str)]
    assert len(spilled) == 1 and spilled[0].read_text().endswith("see photo.jpg")
    assert src["source"]["text_spill_dir"] is not None
    build(src, tmp_path / "ds")  # the spilled text is stored as text, not read as an image
    shutil.rmtree(src["source"]["text_spill_dir"])
    b = get_pipeline("food101")(root, image_size=4, text_format="bytes", text_len=32)
    t = b["samples"][-1].payloads["text"]
    assert t.dtype == np.uint8 and t.shape == (32,)
    assert bytes(t).rstrip(b"\0").decode() == texts[-1][:32]


def test_cmu_mosi_formats_zero_policy_and_padding(tmp_path):
    npz = fixtures.make_cmu_mosi(tmp_path / "npz", fmt="npz", seq_len=4)
    folders = fixtures.make_cmu_mosi(tmp_path / "folders", fmt="folders", seq_len=4)
    a, b = get_pipeline("cmu_mosi")(npz), get_pipeline("cmu_mosi")(folders)
    assert [s.key for s in a["samples"]] == [s.key for s in b["samples"]]
    for sa, sb in zip(a["samples"], b["samples"]):
        assert sa.label == sb.label and sa.split == sb.split
        np.testing.assert_allclose(sa.payloads["text"], sb.payloads["text"])
    assert a["classes"] == ["negative", "positive"]
    with np.load(npz / "train.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["labels"][:3] = 0.0
    np.savez(npz / "train.npz", **arrays)
    dropped = get_pipeline("cmu_mosei")(npz)
    assert dropped["source"]["zero_dropped"] == 3 and len(dropped["samples"]) == len(a["samples"]) - 3
    kept = get_pipeline("cmu_mosi")(npz, zero="positive", sequence="pad", max_len=6)
    assert [s.label for s in kept["samples"][:3]] == ["positive"] * 3
    assert kept["samples"][0].payloads["audio"].shape == (6, 6)
    assert np.all(kept["samples"][0].payloads["audio"][4:] == 0)
    # mean skips the all-zero padding rows
    x = np.array([[0, 0], [1, 3], [3, 5]], np.float32)
    from midas_data.pipelines.cmu_mosi import summarize
    assert summarize(x, "mean", 0, None, "k", "text").tolist() == [2, 4]


def test_mmimdb_single_label_policies(tmp_path):
    root = fixtures.make_mmimdb(tmp_path / "raw", per_split=(6, 2, 2))
    import json
    meta = root / "dataset" / "0000000.json"  # a Drama; make it Drama + Horror
    meta.write_text(json.dumps({"plot": ["x"], "genres": ["Drama", "Horror", "Music"]}))
    ex = get_pipeline("mmimdb")(root, image_size=4)
    assert "0000000" not in {s.key for s in ex["samples"]}  # two top genres: not exclusive
    assert ex["source"]["label_policy_dropped"] == 1 and ex["classes"][0] == "Drama"
    pr = get_pipeline("mmimdb")(root, image_size=4, label_policy="priority")
    s0 = next(s for s in pr["samples"] if s.key == "0000000")
    assert s0.label == "Horror"  # rarest first by default
    own = get_pipeline("mmimdb")(root, image_size=4, label_policy="priority",
                                 genres=["Drama", "Horror", "Comedy"])
    assert next(s for s in own["samples"] if s.key == "0000000").label == "Drama"
    assert {s.label for s in own["samples"]} <= {"Drama", "Horror", "Comedy"}
    assert {s.split for s in ex["samples"]} == {"train", "val", "test"}
    with pytest.raises(ValueError, match="unknown genre 'Dramedy'"):
        get_pipeline("mmimdb")(root, genres=["Dramedy", "Drama"])


def test_options_are_checked_before_reading(tmp_path):
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        get_pipeline("ucf101")(tmp_path, num_frames=0)
    with pytest.raises(ValueError, match="frame_layout"):
        get_pipeline("cremad")(tmp_path, frame_layout="chw")
    with pytest.raises(ValueError, match="text_format"):
        get_pipeline("food101")(tmp_path, text_format="tokens")
    with pytest.raises(ValueError, match="sequence must be"):
        get_pipeline("cmu_mosei")(tmp_path, sequence="max")
    root = fixtures.make_cmu_mosi(tmp_path / "m", per_split=(4, 2, 2))
    src = get_pipeline("cmu_mosi")(root, modalities="text,video")  # a CLI-style string works too
    assert src["modalities"] == ["text", "video"]
