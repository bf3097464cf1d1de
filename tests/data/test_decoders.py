"""The decoder seam: `to_device` gives what each task's loss used to build itself, and `iterate_decoded` counts
bad held-out samples the same way whichever decoder reads them."""
import io

import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.data.decoders import (EvalSampleDecoder, ImageLabelDecoder, ImageTextDecoder, ModalityDecoder,
                                    PairedModalityDecoder)
from pipeline.data.eval_loader import iterate_decoded
from pipeline.data.loader import ShardSet, expand_shards
from pipeline.data.modality_transforms import IMUTransform
from pipeline.shard.writer import ShardWriter

TRANSFORM = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))])


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), colour).save(buf, format="PNG")
    return buf.getvalue()


def _imu(seed: int) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).normal(size=(64, 6)).astype(np.float32))
    return buf.getvalue()


def test_to_device_normalises_images_and_passes_host_fields():
    decoder = ImageTextDecoder(TRANSFORM, lambda captions: torch.ones(len(captions), 5, dtype=torch.long))
    batch = decoder.collate([decoder.sample({"png": _png((i * 40, 20, 200)), "txt": b"a thing"}) for i in range(3)])
    batch.update(keys=["a", "b", "c"], bad={"bad_image": 1}, index=4)
    out = decoder.to_device(batch, "cpu", torch.bfloat16)
    assert torch.equal(out["images"], decoder.image.model_input(batch["images"], "cpu", torch.bfloat16))
    assert out["images"].dtype == torch.bfloat16 and out["texts"].dtype == torch.long
    assert out["keys"] == ["a", "b", "c"] and out["bad"] == {"bad_image": 1} and out["index"] == 4
    assert batch["images"].dtype == torch.uint8  # the loader's batch is left as it was

    labelled = ImageLabelDecoder(TRANSFORM)
    batch = labelled.collate([labelled.sample({"png": _png((9, 9, 9)), "cls": b"7"})])
    out = labelled.to_device(batch, "cpu", torch.float32)
    assert out["labels"].tolist() == [7] and out["labels"].dtype == torch.int64


def test_modality_decoder_to_device_casts_inputs_and_keeps_rows_integer():
    decoder = ModalityDecoder(TRANSFORM, {"imu": IMUTransform(steps=64, train=False)}, {"imu": {}}, reduced_decode=True)
    samples = [decoder.sample({"png": _png((200, 0, 60 * i)), "imu.npy": _imu(i)}) for i in range(3)]
    del samples[1]["imu"]  # as a sample carrying another modality: no imu input, its image still in the batch
    out = decoder.to_device(decoder.collate(samples), "cpu", torch.bfloat16)
    assert out["imu"].dtype == torch.bfloat16 and out["imu"].shape[0] == 2
    assert out["imu_rows"].tolist() == [0, 2] and out["imu_rows"].dtype == torch.int64
    assert out["images"].dtype == torch.bfloat16 and out["images"].shape[0] == 3


def test_iterate_decoded_counts_bad_samples_by_reason_for_any_decoder(tmp_path):
    with ShardWriter(tmp_path, prefix="val", samples_per_shard=100) as w:
        for i in range(10):
            members = {"png": _png((20 * i, 50, 90)), "cls": str(i % 3), "txt": f"thing {i}",
                       "imu.npy": _imu(i)}
            if i == 2:
                members["png"] = b"not an image"
            if i == 5:
                members["cls"] = "five"
            w.write(f"{i:04d}", members)
    shards = ShardSet(expand_shards(str(tmp_path / "val-000000.tar")))
    decoders = [EvalSampleDecoder(TRANSFORM, None), ImageLabelDecoder(TRANSFORM),
                PairedModalityDecoder(TRANSFORM, "imu", IMUTransform(steps=64, train=False))]
    for decoder in decoders:
        batches = list(iterate_decoded(shards, decoder, 4))
        assert [b["index"] for b in batches] == [0, 1, 2]
        bad = {}
        for b in batches:
            for reason, n in b["bad"].items():
                bad[reason] = bad.get(reason, 0) + n
        assert bad == {"bad_image": 1, "bad_label": 1}, type(decoder).__name__
        assert sum(b["images"].shape[0] for b in batches if "images" in b) == 8
