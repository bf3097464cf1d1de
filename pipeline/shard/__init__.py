"""The offline `python -m pipeline shard` tool (raw collections -> indexed WebDataset shards) and the one tar
writer every shard goes through.

    rows.py     what an input row is (SourceRow, Columns, InputError)
    sources.py  input discovery: formats, globs, column checks, every row in order
    tables.py   parquet / CSV / TSV / JSONL readers
    groups.py   folder-tree and tar readers (files grouped by key, sidecars)
    images.py   checking, resizing and encoding the stored image
    samples.py  one row -> one sample's members, or a failure with its reason
    workers.py  the worker processes, results in input order
    writer.py   TarShard (tar + index + rename, the one writer core) and ShardWriter (the library writer)
    splits.py   the tool's shards of one split, with failures, stats and resume
    options.py  the run's settings (ShardOptions)
    run.py      the driver: plan, process, write, manifest and summary

Nothing here is imported by the training read path (`pipeline/data/`).
"""
