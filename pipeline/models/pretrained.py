"""`model.pretrained`: initial weights from a local copy, for CLIP / SigLIP (open_clip) and backbones (timm).

A source is one of
- a weights file: `.safetensors`, or `.pt` / `.pth` / `.bin` read with `torch.load(weights_only=True)` (nothing
  in it is unpickled beyond tensors and plain containers); the state dict may be wrapped as open_clip_train and
  timm save it (`{"state_dict": ...}`, `{"model": ...}`, `{"module": ...}`) and its keys prefixed `module.` (DDP);
- an open_clip directory (`open_clip_config.json` beside `open_clip_model.safetensors` or
  `open_clip_pytorch_model.bin`): `pipeline export` output, or a Hugging Face repository fetched beforehand;
- a timm directory (`config.json` + `model.safetensors` / `pytorch_model.bin`);
- a checkpoint or run directory of this pipeline (its weights consolidated from DeepSpeed's files).

Nothing downloads. `hf-hub:` names, URLs and open_clip pretrained tags (`laion2b_s34b_b79k`) are refused with a
message saying how to fetch the weights once and point at the local copy.

For CLIP the architecture is checked against `model.name` before any process starts (the model is built on the
meta device and compared key by key and shape by shape with the file), so a mismatch is one line, not a
traceback from every rank.
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from pipeline.config import ConfigError

OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPERS = ("state_dict", "model", "module", "model_state_dict")


def _fetch_hint(key: str) -> str:
    return (f"nothing downloads here: fetch the weights once (e.g. `huggingface-cli download ORG/REPO --local-dir "
            f"DIR`, or the file open_clip.list_pretrained() names) and set {key}=DIR or {key}=FILE")


def check_source(value: str, key: str = "model.pretrained") -> Path:
    """The local path `value` names; ConfigError (one line) for hub names, URLs, tags and missing paths."""
    if value.startswith("hf-hub:") or "://" in value:
        raise ConfigError(f"{key}={value!r} names a remote model; {_fetch_hint(key)}")
    value = value.removeprefix("local-dir:")
    p = Path(value).expanduser()
    if p.exists():
        return p
    if "/" not in value and not Path(value).suffix:  # `laion2b_s34b_b79k`, `openai`: open_clip's download tags
        raise ConfigError(f"{key}={value!r} is not a local path (an open_clip pretrained tag would download); "
                          f"{_fetch_hint(key)}")
    raise ConfigError(f"{key}: not found: {value}")


def _unwrap(obj, source: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"model.pretrained: {source} holds no state dict (a mapping of names to tensors)")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConfigError(f"model.pretrained: {source} holds no tensors")
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


class _Shape:
    """A tensor's shape without its data (safetensors header), for the pre-launch check."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def read_weights_file(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file (tensors only; loaded with weights_only=True).
    shapes_only: safetensors files give objects with only a .shape (nothing but the header is read)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if shapes_only:
                with safe_open(str(path), framework="pt") as f:
                    shapes = {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}
                return {(k.removeprefix("module.") if all(n.startswith("module.") for n in shapes) else k): v
                        for k, v in shapes.items()}
            return _unwrap(load_file(str(path)), path)
        except SafetensorError as e:
            raise ConfigError(f"model.pretrained: {path} is not a valid safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive: the error says it
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # mmap needs the zip format; older files load whole
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only rebuilds only tensors and plain containers; a class or function is refused, not called
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise ConfigError(f"model.pretrained: cannot read {path} as a weights file (neither a torch nor a "
                              f"safetensors file)") from None
        raise ConfigError(f"model.pretrained: {path} holds pickled Python objects besides tensors "
                          f"({found.group(1)}), which are "
                          f"never unpickled here; save its state dict alone (torch.save(ckpt['state_dict'], "
                          f"'weights.pt')) or as .safetensors") from None
    except Exception as e:
        if "TorchScript" in str(e):
            raise ConfigError(f"model.pretrained: {path} is a TorchScript archive (e.g. OpenAI's original CLIP "
                              f"files), which is code, not weights; convert it once: open_clip.create_model(NAME, "
                              f"pretrained='{path}') and save its state_dict() as .safetensors") from None
        raise ConfigError(f"model.pretrained: cannot read {path} as a weights file: "
                          f"{str(e).splitlines()[0][:200]}") from None
    return _unwrap(obj, path)


def weights_file(path: Path) -> Path | None:
    """The weights file of an open_clip or timm directory, or None if `path` is neither."""
    for name in OPEN_CLIP_WEIGHTS + TIMM_WEIGHTS:
        if (path / name).is_file():
            return path / name
    return None


def read_state_dict(source: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The weights `model.pretrained` names (see the module docstring), on the CPU, with our key layout.
    shapes_only: the values may only carry .shape (torch files are memory-mapped, so little is read either way)."""
    p = check_source(str(source))
    if p.is_file() and p.name == "latest":  # checkpoints/latest: the checkpoint it names
        p = p.parent
    if p.is_file():
        return read_weights_file(p, shapes_only)
    found = weights_file(p)
    if found is not None:
        return read_weights_file(found, shapes_only)
    from pipeline.export import consolidated_state_dict
    from pipeline.train.checkpoint import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(p)
    except FileNotFoundError:
        raise ConfigError(f"model.pretrained: {p} is a directory with no weights: expected an open_clip directory "
                          f"({' / '.join(OPEN_CLIP_WEIGHTS[:2])}), a timm directory ({' / '.join(TIMM_WEIGHTS)}) "
                          f"or a checkpoint / run directory of this pipeline") from None
    return consolidated_state_dict(ckpt)


def _shape(t) -> tuple:
    shape = tuple(t.shape)
    return () if shape == (1,) else shape  # logit_scale: () in open_clip, (1,) once promoted for DeepSpeed


def mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """A one-line account of missing / unexpected keys and shape differences, or None when `state` fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(_shape(state[k]))} vs {list(_shape(expected[k]))}" for k in expected
              if k in state and _shape(state[k]) != _shape(expected[k])]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    return "; ".join(parts) or None


def check_clip_pretrained(name: str, source: str, loss_name: str = "clip", patch_dropout: float = 0.0) -> None:
    """Before launch: the weights `source` names fit the architecture `name` (built on the meta device)."""
    from pipeline.models.clip import build_open_clip

    state = read_state_dict(source, shapes_only=True)
    model = build_open_clip(name, loss_name, patch_dropout, device="meta")
    problem = mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"model.pretrained={source} does not fit model.name={name}: {problem}")


def load_clip_pretrained(model: torch.nn.Module, name: str, source: str) -> None:
    """Loads the weights `source` names into an open_clip model (strict; scalar shapes reconciled)."""
    from pipeline.models.clip import load_state_dict_reshaped

    state = read_state_dict(source)
    problem = mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"model.pretrained={source} does not fit model.name={name}: {problem}")
    load_state_dict_reshaped(model, state)
