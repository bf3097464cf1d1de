"""Generated demo datasets (the shapes world and its paired modalities), written as indexed shards with
`pipeline.shard.writer.ShardWriter`. Not part of the training read path: `pipeline demo`, the tests and the
benchmarks make their data with these.

    shapes.py      pictures of coloured shapes with compositional captions (40 classes)
    multimodal.py  the same world with audio, depth, thermal and IMU per sample or per paired set
"""
