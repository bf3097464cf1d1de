import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.data.decoders import image_member
from pipeline.data.image_decode import decode_image
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.data.modality_transforms import AudioTransform, DepthTransform
from pipeline.demo_data.multimodal import write_multimodal_demo_dataset
from pipeline.eval.emergent import evaluate_emergent, format_emergent
from pipeline.models.imagebind import ImageBindModel, build_imagebind, tiny_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = write_multimodal_demo_dataset(tmp_path_factory.mktemp("mm"), train_samples=4, val_samples=24,
                                          samples_per_shard=10)
    torch.manual_seed(0)
    model, _, eval_tf, tokenizer = build_imagebind("clip-tiny", {"audio": tiny_config("audio", 128),
                                                                 "depth": tiny_config("depth", 128)})
    return paths, model, eval_tf, tokenizer


@pytest.mark.parametrize("modality", ["audio", "depth"])
def test_emergent_metrics(setup, modality):
    paths, model, eval_tf, tokenizer = setup
    transform = (AudioTransform(clip_seconds=1.0, clips=2, n_mels=64, target_frames=100, train=False)
                 if modality == "audio" else DepthTransform(size=48, train=False))
    r = evaluate_emergent(model, modality, paths["val"], eval_tf, transform, tokenizer, paths["classes"],
                          batch_size=10, recall_at=[1, 5])
    assert r["samples"] == 24 and r["bad"] == {} and r["classes"] == 40
    for key in (f"{modality}_zero_shot_top1", f"{modality}_zero_shot_top5", "image_zero_shot_top1",
                f"{modality}2image_R@1", f"image2{modality}_R@5", f"text2{modality}_R@1", f"{modality}2text_R@5"):
        assert 0.0 <= r[key] <= 1.0, key
    assert r[f"{modality}2image_R@1"] <= r[f"{modality}2image_R@5"]
    assert "emergent" in format_emergent(r)


@pytest.mark.parametrize("shift", [0, 1])
def test_perfect_binding_scores_perfectly(setup, shift):
    """An encoder that outputs the image tower's own embedding of the sample makes every metric equal the image's
    (shift 0). Shifted by one sample (the audio of sample i is embedded as picture i+1), every audio <-> image
    match is wrong: the evaluation scores the modality tower's output, not the image features again."""
    paths, model, eval_tf, tokenizer = setup

    class Oracle(torch.nn.Module):
        config = SimpleNamespace(modality="audio", embed_dim=128)

        def __init__(self, features):
            super().__init__()
            self.features = features

        def forward(self, index):
            return self.features[(index.long().flatten() + shift) % len(self.features)]

    shards = ShardSet(expand_shards(paths["val"]))
    images = torch.stack([eval_tf(decode_image(image_member(shards.read(i)[1]))) for i in range(shards.total)])
    counter = iter(range(shards.total))  # the "audio" input of sample i is its index
    oracle_model = ImageBindModel(model.clip, {"audio": Oracle(model.encode_image(images))})
    r = evaluate_emergent(oracle_model, "audio", paths["val"], eval_tf, lambda _: torch.tensor([next(counter)]),
                          tokenizer, paths["classes"], batch_size=7, recall_at=[1])
    if shift == 0:
        assert r["audio2image_R@1"] == 1.0 and r["image2audio_R@1"] == 1.0
        assert math.isclose(r["audio_zero_shot_top1"], r["image_zero_shot_top1"])
    else:
        assert r["audio2image_R@1"] == 0.0 and r["image2audio_R@1"] == 0.0


def test_paired_set_without_captions_is_scored_without_caption_retrieval(setup, tmp_path):
    from pipeline.shard.writer import ShardWriter

    paths, model, eval_tf, tokenizer = setup
    shards = ShardSet(expand_shards(paths["val"]))
    with ShardWriter(tmp_path, prefix="nocap", samples_per_shard=100) as w:
        for i in range(shards.total):
            key, raw = shards.read(i)
            w.write(key, {k: v for k, v in raw.items() if k != "txt"})
    transform = DepthTransform(size=48, train=False)
    plain = evaluate_emergent(model, "depth", paths["val"], eval_tf, transform, tokenizer, paths["classes"],
                              batch_size=10, recall_at=[1])
    r = evaluate_emergent(model, "depth", str(tmp_path / "nocap-000000.tar"), eval_tf, transform, tokenizer,
                          paths["classes"], batch_size=10, recall_at=[1])
    assert r["samples"] == 24 and r["bad"] == {} and "text2depth_R@1" not in r and "depth2text_R@1" not in r
    for key in ("depth_zero_shot_top1", "image_zero_shot_top1", "depth2image_R@1", "image2depth_R@1"):
        assert r[key] == plain[key], key
