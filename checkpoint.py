"""Hugging Face checkpoint directories on disk: config.json beside model.safetensors, or beside shards and their
model.safetensors.index.json. Reading checks every tensor against the shapes a model expects before anything is
built from it; writing goes file by file through a temporary name, so a crash mid-save leaves the previous files
whole. The model that fills or empties these dicts is model.py's Llama."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import data


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used; the message is one line naming the file/tensor."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def split_shards(sd: dict, max_shard_bytes: int) -> list[dict]:
    """Consecutive tensors grouped into shards of at most max_shard_bytes (a bigger tensor alone)."""
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + _nbytes(v) > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + _nbytes(v)
    return shards + [cur]


def check_tensors(path, expected: dict, sd: dict):
    """CheckpointError naming the first tensor of sd that is missing, unexpected, misshapen or not float."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} (expected shape {tuple(expected[missing[0]])})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} with shape {tuple(sd[unexpected[0]].shape)}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
    for k, shape in expected.items():
        t = sd[k]
        if t.shape != shape:
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {k} has dtype {t.dtype}, expected a floating-point dtype")


def read_safetensors_dir(path: Path, device=None) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded HF checkpoint directory; any unreadable file is one error."""
    from safetensors.torch import load_file
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    sd = {}
    for f in files:
        try:
            part = load_file(str(f), device=str(device) if device is not None else "cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
            raise CheckpointError(f"{f}: unreadable safetensors file ({type(e).__name__}: {e})") from None
        for k, v in part.items():
            if k in sd:
                raise CheckpointError(f"{f}: tensor {k} appears in more than one shard")
            sd[k] = v
    return sd


def write_safetensors_dir(path, sd: dict, hf_config: dict, max_shard_bytes: int | None = None):
    """Write sd as an HF-layout directory: config.json (hf_config plus the tensors' torch_dtype) and
    model.safetensors, or shards of at most max_shard_bytes and their index. Whichever layout is written, the
    other one's file is removed afterwards, so a reader never finds both."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    shards = [sd] if max_shard_bytes is None else split_shards(sd, max_shard_bytes)
    dtype = next(iter(sd.values())).dtype
    cfg = {**hf_config, "torch_dtype": str(dtype).removeprefix("torch.")}
    data.atomic_write_text(path / "config.json", json.dumps(cfg, indent=2) + "\n")
    if len(shards) == 1:
        with data.atomic_path(path / "model.safetensors") as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with data.atomic_path(path / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(_nbytes(v) for v in sd.values())
    data.atomic_write_text(path / "model.safetensors.index.json",
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "model.safetensors").unlink(missing_ok=True)
