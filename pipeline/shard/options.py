"""The settings of one `python -m pipeline shard` run, as parsed from its command line, and their checks."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from pipeline.shard.images import ImageSettings
from pipeline.shard.rows import Columns, InputError

TAR_END = 1024                # the two zero blocks that end a tar


@dataclass
class ShardOptions:
    inputs: list[str]
    output: str
    input_format: str = "auto"
    columns: Columns = field(default_factory=Columns)
    image_root: str | None = None
    samples_per_shard: int = 10_000
    max_shard_bytes: int | None = None
    prefix: str | None = None
    workers: int = 1
    image: ImageSettings = field(default_factory=ImageSettings)
    max_caption_bytes: int = 16384  # longer captions fail as caption_too_long (the loader's default limit too)
    dedup_image: bool = False
    val_fraction: float = 0.0
    max_failure_rate: float = 0.5
    overwrite: bool = False
    progress: bool = False

    def validate(self) -> None:
        if self.samples_per_shard <= 0:
            raise InputError(f"--samples-per-shard must be > 0, not {self.samples_per_shard}")
        if self.max_shard_bytes is not None and self.max_shard_bytes <= TAR_END:
            raise InputError(f"--max-shard-bytes must be > {TAR_END}, not {self.max_shard_bytes}")
        if self.max_caption_bytes <= 0:
            raise InputError(f"--max-caption-bytes must be > 0, not {self.max_caption_bytes}")
        if self.workers < 0:
            raise InputError(f"--workers must be >= 0, not {self.workers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise InputError(f"--max-failure-rate must be in [0, 1], not {self.max_failure_rate}")
        if self.prefix is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", self.prefix):
            raise InputError(f"--prefix must be letters, digits, '_' or '-', not {self.prefix!r}")

    def splits(self) -> list[str]:
        """"" is the single split written straight into the output directory."""
        return ["train", "val"] if self.val_fraction > 0 else [""]

    def split_prefix(self, split: str) -> str:
        if not split:
            return self.prefix or "shard"
        return f"{self.prefix}-{split}" if self.prefix else split

    def job_settings(self) -> dict:
        """Everything that shapes the output (not workers, progress or the failure threshold)."""
        return {"columns": asdict(self.columns), "image_root": self.image_root, "input_format": self.input_format,
                "samples_per_shard": self.samples_per_shard, "max_shard_bytes": self.max_shard_bytes,
                "prefix": self.prefix, "image": asdict(self.image), "max_caption_bytes": self.max_caption_bytes,
                "dedup_image": self.dedup_image,
                "val_fraction": self.val_fraction}


def parse_size(text: str, option: str = "--max-shard-bytes") -> int:
    """'512MB', '1.5GiB', '1e9', '200k' -> bytes (decimal units; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise InputError(f"{option}: not a size: {text!r} (e.g. 1GB, 500MB, 1e9)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
