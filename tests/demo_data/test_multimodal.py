import json

import numpy as np
import webdataset as wds

from pipeline.data.loader import ShardSet, expand_shards
from pipeline.data.modalities import decode_audio, decode_depth, decode_modality
from pipeline.demo_data.multimodal import BASE_FREQ, render_multimodal_sample, size_of, write_multimodal_demo_dataset
from pipeline.demo_data.shapes import SIZES, render_sample


def test_shards_read_back_with_plain_webdataset(tmp_path):
    paths = write_multimodal_demo_dataset(tmp_path, train_samples=25, val_samples=7, samples_per_shard=10, seed=3)
    assert paths["train"].endswith("train-{000000..000002}.tar")
    classes = json.loads(open(paths["classes"]).read())
    assert len(classes["classes"]) == 40 and classes["templates"]
    samples = list(wds.WebDataset(paths["train"], shardshuffle=False, empty_check=False))
    assert len(samples) == 25
    for s in samples:
        assert {"jpg", "txt", "cls", "json", "wav", "depth.png"} <= set(s)
    # the project's index and decoders read them too; the picture is the image demo's, bit for bit
    shards = ShardSet(expand_shards(paths["val"]))
    assert shards.total == 7
    key, raw = shards.read(4)
    jpg, caption, label = render_sample(3, "val", 4)
    assert raw["jpg"] == jpg and raw["txt"].decode() == caption and int(raw["cls"]) == label
    audio = decode_modality(raw, "audio")
    assert audio.value.shape == (16000,) and audio.conversions == ()
    depth = decode_modality(raw, "depth")
    assert depth.value.shape == (64, 64) and 2.0 < np.median(depth.value) < 3.6
    # a second call with the same settings reuses the shards
    assert write_multimodal_demo_dataset(tmp_path, train_samples=25, val_samples=7, samples_per_shard=10,
                                         seed=3) == paths


def test_audio_pitch_follows_colour_and_depth_raises_the_shape():
    for i in range(12):
        m = render_multimodal_sample(0, "train", i)
        label = int(m["cls"])
        x = decode_audio(m["wav"], "wav").value
        spectrum = np.abs(np.fft.rfft(x))
        peak_hz = np.argmax(spectrum) * 16000 / len(x)
        expected = BASE_FREQ * 2 ** ((label // 5) / 2)
        assert abs(peak_hz / expected - 1) < 0.05
        size = size_of(0, "train", i)
        assert not any(s in m["txt"] for s in SIZES if s != size)  # agrees with the caption when it names one
        d = decode_depth(m["depth.png"], "depth.png").value
        valid = d > 0
        assert 0.97 < valid.mean() < 1.0
        assert d[valid].min() < np.median(d[valid]) - 0.5  # the object stands out from the background
        assert render_multimodal_sample(0, "train", i)["wav"] == m["wav"]  # deterministic


def test_disjoint_sets_pair_each_picture_with_one_modality(tmp_path):
    from pipeline.demo_data.multimodal import DISJOINT_MODALITIES, write_disjoint_demo_datasets

    paths = write_disjoint_demo_datasets(tmp_path, train_samples=12, val_samples=5, samples_per_shard=10)
    assert paths["modalities"] == list(DISJOINT_MODALITIES)
    sources, seen = paths["train"].split("::"), set()
    assert len(sources) == 4 and len(paths["val"].split("::")) == 4
    assert paths["classes"] == str(tmp_path / "classes.json")
    assert len(json.loads(open(paths["classes"]).read())["classes"]) == 40
    members = {"audio": "wav", "depth": "depth.png", "thermal": "thermal.png", "imu": "imu.npy"}
    for m, pattern in zip(DISJOINT_MODALITIES, sources):
        samples = list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))
        assert len(samples) == 12
        for s in samples:  # the picture and its caption, plus this set's modality and no other
            assert set(s) - {"__key__", "__url__", "__local_path__"} == {"jpg", "txt", "cls", "json", members[m]}
            assert s["jpg"] not in seen  # no picture is in two sets (or twice in one)
            seen.add(s["jpg"])
            decode_modality({members[m]: s[members[m]]}, m)  # the project's decoders accept them


def test_thermal_heat_follows_the_colour_and_imu_pace_the_colour_and_corners_the_shape():
    from pipeline.data.modalities import decode_imu, decode_thermal
    from pipeline.demo_data.multimodal import IMU_RATE, render_paired_sample
    from pipeline.demo_data.shapes import SHAPES

    heat_by_colour, checked_imu = {}, 0
    for i in range(60):
        s = render_paired_sample("thermal", 0, "train", i)
        t = decode_thermal(s["thermal.png"], "thermal.png").value
        heat_by_colour.setdefault(int(s["cls"]) // 5, []).append(np.percentile(t, 99))
        s = render_paired_sample("imu", 0, "train", i)
        x = decode_imu(s["imu.npy"]).value
        assert x.shape == (500, 6) and abs(np.median(x[:, 2]) - 1.0) < 0.05  # gravity on z
        colour, shape = divmod(int(s["cls"]), 5)
        laps_per_s = 0.25 * 1.25 ** colour
        if SHAPES[shape] == "circle":  # a steady turn: the yaw rate is 2 pi x laps per second
            assert abs(np.median(x[:, 5]) / (2 * np.pi * laps_per_s) - 1) < 0.06
            checked_imu += 1
        elif SHAPES[shape] in ("triangle", "square"):  # one sharp turn per corner
            yaw = x[:, 5]
            high = np.flatnonzero(yaw > 0.5 * yaw.max())
            spikes = np.split(high, np.flatnonzero(np.diff(high) > 5) + 1)  # runs of high yaw rate: one per turn
            laps = 500 / IMU_RATE * laps_per_s
            corners = {"triangle": 3, "square": 4}[SHAPES[shape]]
            assert abs(len(spikes) - corners * laps) <= 1.5, (SHAPES[shape], len(spikes), corners * laps)
            checked_imu += 1
    assert checked_imu >= 10
    means = [np.mean(heat_by_colour[c]) for c in sorted(heat_by_colour)]
    assert len(means) == 8 and all(b > a for a, b in zip(means, means[1:]))  # each paint hotter than the last
