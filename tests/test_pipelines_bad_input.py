"""Bad input: a clear error naming file, key and field; `skip_bad=True` counts and lists it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from midas_data.pipelines import fixtures, get_pipeline

from midas_data import MidasDataError, SchemaError, build_dataset, open_dataset

AV = {"n_mels": 8, "audio_frames": 10, "num_frames": 2, "frame_size": 4}
CLIP = "1001_DFA_HAP_XX"


def check(name, root, match, key, field, n_bad=1, **opts):
    """The reader raises a located SchemaError; with skip_bad it leaves `key` out and lists it."""
    reader = get_pipeline(name)
    with pytest.raises(SchemaError, match=match) as e:
        reader(root, **opts)
    assert f"key {key!r}" in str(e.value) and f"field {field!r}" in str(e.value)
    assert "file " in str(e.value)
    src = reader(root, skip_bad=True, **opts)
    assert src["source"]["skipped_count"] == n_bad
    assert key in [item["key"] for item in src["source"]["skipped"]]
    assert key not in {s.key for s in src["samples"]}
    return src


@pytest.fixture
def cremad(tmp_path):
    return fixtures.make_cremad(tmp_path / "cremad", per_class=2, split_lists=True)


def test_cremad_missing_audio_is_located_and_skippable(cremad, tmp_path):
    (cremad / "AudioWAV" / f"{CLIP}.wav").unlink()
    src = check("cremad", cremad, r"AudioWAV/1001_DFA_HAP_XX\.wav.*modality missing", CLIP, "audio", **AV)
    m = build_dataset(src["samples"], tmp_path / "ds", classes=src["classes"],
                      modalities=src["modalities"], source=src["source"], progress=False)
    assert m["source"]["skipped_count"] == 1
    assert open_dataset(tmp_path / "ds").manifest["source"]["skipped"][0]["key"] == CLIP


def test_cremad_missing_frames_and_too_few_frames(cremad):
    shutil.rmtree(cremad / "Image-01-FPS" / CLIP)
    check("cremad", cremad, "frame folder does not exist", CLIP, "visual", **AV)
    (cremad / "Image-01-FPS" / CLIP).mkdir()
    fixtures.write_jpg(cremad / "Image-01-FPS" / CLIP / "00001.jpg", np.zeros((4, 4, 3)))
    check("cremad", cremad, r"1 frame\(s\), but 2", CLIP, "visual", **AV)
    ok = get_pipeline("cremad")(cremad, allow_short=True, **AV)
    assert CLIP in {s.key for s in ok["samples"]}


def test_cremad_unreadable_media(cremad):
    (cremad / "AudioWAV" / f"{CLIP}.wav").write_bytes(b"RIFF\x00\x00garbage")
    check("cremad", cremad, "unreadable wav", CLIP, "audio", **AV)
    fixtures.make_cremad(cremad, per_class=2)  # restore
    (cremad / "Image-01-FPS" / CLIP / "00001.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    check("cremad", cremad, "unreadable image", CLIP, "visual", **AV)


def test_cremad_unknown_emotion_and_absent_listed_clip(cremad):
    bad = "1001_DFA_XYZ_XX"
    (cremad / "train.csv").write_text((cremad / "train.csv").read_text() + f"{bad},XYZ\n")
    fixtures.write_wav(cremad / "AudioWAV" / f"{bad}.wav", np.zeros(800), 8000)
    check("cremad", cremad, "emotion codes", bad, "label", **AV)
    (cremad / "AudioWAV" / f"{bad}.wav").unlink()
    (cremad / "train.csv").write_text((cremad / "train.csv").read_text().replace(f"{bad},XYZ\n", ""))
    ghost = "1001_DFA_SAD_LO"
    (cremad / "train.csv").write_text((cremad / "train.csv").read_text() + f"{ghost},SAD\n")
    src = get_pipeline("cremad")(cremad, skip_bad=True, **AV)
    assert [i["key"] for i in src["source"]["skipped"]] == [ghost]
    with pytest.raises(SchemaError, match=r"train\.csv, key '1001_DFA_\w+_\w+', field 'audio'.*absent"):
        get_pipeline("cremad")(cremad, **AV)


def test_kinetics_sounds_unknown_class_and_missing_audio(tmp_path):
    root = fixtures.make_kinetics_sounds(tmp_path / "ks", per_class=2)
    clip = "yt00x000_000010_000020"
    text = (root / "train.csv").read_text().replace(f"{clip},playing drums", f"{clip},playing kazoo")
    (root / "train.csv").write_text(text)
    check("kinetics_sounds", root, "unknown class 'playing kazoo'", clip, "label", **AV)
    (root / "train.csv").write_text(text.replace("playing kazoo", "playing drums"))
    (root / "audio" / f"{clip}.wav").unlink()
    check("kinetics_sounds", root, "named in .*train.csv", clip, "audio", **AV)
    for f in ("train.csv", "test.csv"):
        (root / f).unlink()
    with pytest.raises(MidasDataError, match="no split lists"):
        get_pipeline("kinetics_sounds")(root, **AV)


def test_ucf101_unknown_class_and_absent_clip(tmp_path):
    root = fixtures.make_ucf101(tmp_path / "ucf", train_per_class=1, test_per_class=1, frames=4)
    lists = root / "ucfTrainTestlist"
    with open(lists / "testlist01.txt", "a") as f:
        f.write("Juggling/v_Juggling_g01_c01.avi\nArchery/v_Archery_g09_c01.avi\n")
    opts = {"num_frames": 2, "flow_stack": 2, "frame_size": 4}
    with pytest.raises(SchemaError, match=r"testlist01\.txt, key 'v_Juggling_g01_c01', field 'label'"):
        get_pipeline("ucf101")(root, **opts)
    src = get_pipeline("ucf101")(root, skip_bad=True, **opts)
    assert [i["key"] for i in src["source"]["skipped"]] == ["v_Juggling_g01_c01", "v_Archery_g09_c01"]
    assert "frame folder does not exist" in src["source"]["skipped"][1]["error"]


def test_food101_absent_image_missing_text_unknown_class(tmp_path):
    root = fixtures.make_food101(tmp_path / "food", train_per_class=2, test_per_class=1)
    csv = root / "texts" / "train_titles.csv"
    csv.write_text(csv.read_text() + "ghost_1.jpg,a ghost recipe,apple_pie\n")
    check("food101", root, "names an image that does not exist", "ghost_1.jpg", "image", image_size=4)
    csv.write_text(csv.read_text().replace("ghost_1.jpg,a ghost recipe,apple_pie\n", ""))
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(ln for ln in lines if not ln.startswith("baklava_train1.jpg")) + "\n")
    check("food101", root, "no text row", "baklava_train1", "text", image_size=4)
    fixtures.make_food101(root, train_per_class=2, test_per_class=1)  # restore
    fixtures.write_jpg(root / "images" / "test" / "pizza" / "pizza_0.jpg", np.zeros((4, 4, 3)))
    check("food101", root, "unknown class 'pizza'", "pizza_0", "label", modalities=["image", "text"],
          image_size=4)


def test_cmu_mosi_bad_features(tmp_path):
    root = fixtures.make_cmu_mosi(tmp_path / "mosi", fmt="folders")
    key_file = "segtrain001[1]"
    np.save(root / "train" / "audio" / f"{key_file}.npy", np.full((5, 6), np.nan, np.float32))
    check("cmu_mosi", root, "NaN or inf", "segtrain001-1", "audio")
    np.save(root / "train" / "audio" / f"{key_file}.npy", np.ones((5, 7), np.float32))
    check("cmu_mosi", root, "feature dimension 7 differs from 6", "segtrain001-1", "audio")
    (root / "train" / "audio" / f"{key_file}.npy").unlink()
    check("cmu_mosi", root, "feature file missing", "segtrain001-1", "audio")
    np.save(root / "train" / "audio" / f"{key_file}.npy", np.array([{"a": 1}]), allow_pickle=True)
    check("cmu_mosi", root, "unreadable .npy", "segtrain001-1", "audio")
    npz = fixtures.make_cmu_mosi(tmp_path / "npz")
    with np.load(npz / "test.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "vision"}
    np.savez(npz / "test.npz", **arrays)
    with pytest.raises(SchemaError, match=r"test\.npz, field 'video'.*modality array missing"):
        get_pipeline("cmu_mosi")(npz)


def test_mmimdb_absent_movie_and_missing_plot(tmp_path):
    root = fixtures.make_mmimdb(tmp_path / "imdb", per_split=(6, 2, 2))
    split = json.loads((root / "split.json").read_text())
    split["train"].append("9999999")
    (root / "split.json").write_text(json.dumps(split))
    check("mmimdb", root, "metadata file does not exist", "9999999", "text", image_size=4)
    (root / "dataset" / "0000001.json").write_text(json.dumps({"genres": ["Comedy"]}))
    (root / "dataset" / "0000002.jpeg").unlink()
    src = get_pipeline("mmimdb")(root, skip_bad=True, image_size=4)
    assert [i["key"] for i in src["source"]["skipped"]] == ["0000001", "0000002", "9999999"]
    with pytest.raises(SchemaError, match=r"0000001\.json, key '0000001', field 'text'.*no plot"):
        get_pipeline("mmimdb")(root, image_size=4)


def test_everything_skipped_is_an_error_that_says_so(cremad):
    shutil.rmtree(cremad / "AudioWAV")
    (cremad / "AudioWAV").mkdir()
    with pytest.raises(MidasDataError, match=r"no usable clips \(12 skipped as bad\)"):
        get_pipeline("cremad")(cremad, skip_bad=True, **AV)
