"""Runs open_clip_train.main with our model configs (configs/model/*.json, e.g. clip-tiny) registered.

Used by bench/train_vs_open_clip.py inside a separate virtual environment that has webdataset 0.2.x:
    python bench/open_clip_train_entry.py --model clip-tiny --train-data ... [open_clip_train flags]
"""
import sys
from pathlib import Path

import open_clip
from open_clip_train.main import main

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"

if __name__ == "__main__":
    open_clip.add_model_config(str(MODEL_CONFIG_DIR))
    sys.exit(main(sys.argv[1:]))
