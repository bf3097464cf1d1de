import json

import numpy as np
import webdataset as wds

from pipeline.data.demo_dataset import SIZES, render_sample
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.data.modalities import decode_audio, decode_depth, decode_modality
from pipeline.data.multimodal_demo import BASE_FREQ, render_multimodal_sample, size_of, write_multimodal_demo_dataset


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
