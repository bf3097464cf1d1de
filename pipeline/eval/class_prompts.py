"""Class names and prompt templates for zero-shot classification (`data.classes`, `eval --classes`), and the
classifier weights they give, computed over all ranks.

`data.classes` takes one of:
- `imagenet`: the 1000 ImageNet-1k class names (label i = class i, the usual ILSVRC order) and OpenAI's 80
  prompt templates, read at run time from open_clip's own metadata (`open_clip.zero_shot_metadata`), the set
  open_clip_train's ImageNet zero-shot uses;
- a JSON file holding a list of class names (label i = name i), prompted with open_clip's 7
  `SIMPLE_IMAGENET_TEMPLATES` ("itap of a {}.", "a bad photo of the {}.", ...), which name no dataset;
- a JSON file `{"classes": [...], "templates": [...]}`, each template a string with one `{}` for the name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import torch

from pipeline.config import ConfigError
from pipeline.eval.ranks import EvalRanks

IMAGENET = "imagenet"
Template = Union[str, Callable[[str], str]]


@dataclass(frozen=True)
class ClassPrompts:
    classes: Sequence[str]  # label i is classes[i]
    templates: Sequence[Template]  # "a photo of a {}." or a function of the class name (open_clip's metadata)


def _check_names(values, what: str, key: str, source: str) -> list[str]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(f"{key}: {source}: {what} must be a non-empty list of non-empty strings")
    return values


def load_class_prompts(spec: str, key: str = "data.classes") -> ClassPrompts:
    """`imagenet`, or a JSON file (see the module docstring); a bad one raises ConfigError naming `key`."""
    if spec == IMAGENET:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        return ClassPrompts(IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{key}: file not found: {spec} (give '{IMAGENET}', a JSON list of class names, or a JSON "
                          f"{{\"classes\": [...], \"templates\": [...]}})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: {spec} is not valid JSON ({e})") from None
    if isinstance(data, list):
        from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

        return ClassPrompts(_check_names(data, "the class names", key, spec), SIMPLE_IMAGENET_TEMPLATES)
    if not isinstance(data, dict) or set(data) != {"classes", "templates"}:
        raise ConfigError(f"{key}: {spec} must hold a list of class names or an object with exactly the keys "
                          f"\"classes\" and \"templates\"")
    classes = _check_names(data["classes"], "\"classes\"", key, spec)
    templates = _check_names(data["templates"], "\"templates\"", key, spec)
    for t in templates:
        try:
            filled = t.format("x")
        except (IndexError, KeyError, ValueError):
            filled = t
        if filled == t or t.count("{}") != 1:
            raise ConfigError(f"{key}: {spec}: template {t!r} must contain '{{}}' exactly once (where the class "
                              f"name goes) and no other braces")
    return ClassPrompts(classes, templates)


@torch.no_grad()
def zero_shot_weights(model, tokenizer, prompts: ClassPrompts, device: torch.device,
                      ranks: EvalRanks | None = None) -> torch.Tensor:
    """(classes, d) float32 classifier: per class, the normalised mean of its normalised prompt embeddings.
    The rows are open_clip's `build_zero_shot_classifier` (tests/eval/test_zero_shot.py checks the equality);
    this wrapper only adds what it lacks: spreading the classes over the ranks (each encodes a contiguous slice,
    so ImageNet's 80,000 prompts cost 1/world_size each) and gathering the rows so that every rank gets all."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    ranks = ranks or EvalRanks.current()
    part = ranks.slice(len(prompts.classes))
    names = list(prompts.classes[part.start:part.stop])
    templates = list(prompts.templates)
    if names:
        weights = build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=10,
                                             device=device).T.float()
    else:  # more ranks than classes
        weights = torch.zeros(0, 0, device=device)
    return ranks.gather_rows(weights)
