"""Serving checkpoints: a directory with `config.json`, `model.safetensors` and `tokenizer.model`.

Written into a temporary sibling directory and renamed into place, so a reader never sees half a
checkpoint. Loaded without pickle (safetensors + JSON + sentencepiece bytes). (Training checkpoints,
sharded per rank, are `pali.train.sharded_checkpoint`.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pali.config import PaLIConfig
from pali.factory import create_model
from pali.models.pali import PaLI

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1


def save_pretrained(model: PaLI, tokenizer, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write a serving checkpoint atomically (temp dir + rename). Returns the final path."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = {"format_version": FORMAT_VERSION, "model": model.cfg.to_dict(), **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "preset": model.cfg.name})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_streamed(state: Mapping[str, torch.Tensor], cfg: PaLIConfig, tokenizer, out_dir: str | os.PathLike,
                  extra: dict | None = None) -> str | Path:
    """Write a serving checkpoint from a read-on-access `state` (e.g. a sharded training checkpoint),
    one tensor at a time: no whole model is ever in memory. Returns where it was written (a Path when local).

    The tensor list and shapes come from the model on the meta device. A local `out_dir` is written into a
    temporary sibling and renamed into place (as `save_pretrained`); on object storage, where nothing
    renames, the previous `config.json` is deleted first and the new one written last, so a reader (which
    needs `config.json`) never loads a half-written checkpoint.
    """
    from pali import storage

    model = create_model(cfg, device="meta")
    specs = [(k, v.shape, v.dtype) for k, v in model.state_dict().items()]
    missing = sorted({k for k, _, _ in specs} - set(state))
    if missing:
        raise ValueError(f"the state lacks {len(missing)} of the model's tensors, e.g. {missing[:5]}")
    meta = {"format_version": FORMAT_VERSION, "model": cfg.to_dict(), **(extra or {})}

    def write_into(d: str) -> None:
        storage.write_safetensors_streamed(storage.join(d, WEIGHTS_FILE), specs, state.__getitem__,
                                           metadata={"format": "pt", "preset": cfg.name})
        if tokenizer is not None:
            fs, p = storage.filesystem_for(storage.join(d, TOKENIZER_FILE))
            with fs.open_output_stream(p) as f:
                f.write(tokenizer.model_proto)
        fs, p = storage.filesystem_for(storage.join(d, CONFIG_FILE))
        with fs.open_output_stream(p) as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True).encode())

    if storage.is_uri(out_dir):
        fs, p = storage.filesystem_for(out_dir)
        fs.create_dir(p, recursive=True)
        if storage.exists(storage.join(out_dir, CONFIG_FILE)):
            fs.delete_file(p + "/" + CONFIG_FILE)
        write_into(str(out_dir))
        return str(out_dir)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_into(str(tmp))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, putting a previous `out` back if the rename fails."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def load_config(ckpt_dir: str | os.PathLike) -> PaLIConfig:
    """The model config recorded in a serving checkpoint (a local directory or an object-storage URI)."""
    from pali import storage

    path = storage.join(ckpt_dir, CONFIG_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} is missing; a serving checkpoint holds {CONFIG_FILE}, {WEIGHTS_FILE} "
                                f"and {TOKENIZER_FILE}")
    meta = json.loads(storage.read_text(path))
    return PaLIConfig.from_dict(meta["model"] if "model" in meta else meta)


def load_state(model: PaLI, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy `state` into `model`, naming any missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs expected {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not match the model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state, strict=True, assign=any(p.is_meta for p in model.parameters()))


def load_pretrained(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None):
    """(PaLI, Tokenizer) from a serving checkpoint directory; a missing file is an error naming it."""
    from pali import storage
    from pali.tokenizer import Tokenizer

    ckpt = storage.local_checkpoint(ckpt_dir)  # a URI is read from a cached local copy
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    cfg = load_config(ckpt)
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; expected the consolidated weights in {WEIGHTS_FILE}")
    model = create_model(cfg, device="meta")
    load_state(model, load_file(str(weights), device=str(device)), source=str(weights))
    if cfg.freeze_vision:
        model.freeze_vision()
    if dtype is not None:
        model.to(dtype)
    model.eval()
    tok_path = ckpt / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} is missing; a serving checkpoint holds its sentencepiece model")
    return model, Tokenizer.load(tok_path)
