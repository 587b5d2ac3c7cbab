"""Building PaLI models: `create_model(preset)` and the per-parameter initialisation it uses.

Every parameter is drawn from its own generator seeded from (seed, name), so the initial weights do
not depend on the device, the dtype or how the model is sharded (`init_tensor` regenerates one alone).
"""

from __future__ import annotations

import zlib

import torch

from pali.config import PaLIConfig, get_preset
from pali.models.pali import PaLI


def create_model(preset_or_config: str | PaLIConfig, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, seed: int | None = None) -> PaLI:
    """A freshly initialised PaLI from a preset name ("tiny", "pali-3b", ...) or a `PaLIConfig`.

    Every parameter is drawn from its own generator seeded from (seed, name) (see `init_tensor`), so the
    weights do not depend on the device, the dtype or how the model is sharded. seed=None draws the base
    seed from the global torch RNG. `device=None` builds on the current default device: the CPU, or
    the device of an enclosing `with torch.device(...)` block. `device="meta"` (or `with
    torch.device("meta"):`, the torchtitan / accelerate idiom) builds the structure without memory
    (parameter counting, planning, sharded loads).
    """
    cfg = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if seed is not None:
        torch.manual_seed(seed)  # callers may rely on the global stream being seeded too
    device = torch.get_default_device() if device is None else torch.device(device)
    with torch.device(device):
        model = PaLI(cfg)
    if device.type != "meta":
        init_weights(model, seed)
    if dtype is not None:
        model.to(dtype)
    return model


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter `name` under base seed `seed`: crc32 of "<seed>/<name>".

    32 bits on purpose: the CPU generator (mt19937) keeps only the low 32 bits of its seed.
    """
    return zlib.crc32(f"{int(seed)}/{name}".encode())


def _fill_(p: torch.Tensor, cfg: PaLIConfig, name: str, seed: int) -> torch.Tensor:
    """Initialise the full CPU tensor `p` of parameter `name` in place (T5 fan-in normal; ViT trunc-normal)."""
    t = cfg.text
    g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
    if name.endswith(("norm1.weight", "norm2.weight", "norm3.weight", "final_norm.weight")):
        return p.fill_(1.0)
    if name.endswith(".bias"):
        return p.zero_()
    if name.startswith("text."):
        if name.endswith("shared.weight"):
            return p.normal_(0.0, 1.0, generator=g)
        if name.endswith("lm_head.weight") or "relative_attention_bias" in name:
            return p.normal_(0.0, t.d_model ** -0.5, generator=g)
        if name.endswith("attn.q.weight"):
            # T5 does not scale scores by 1/sqrt(d_kv); its reference init folds the scale into q instead,
            # otherwise attention starts saturated (near one-hot) and barely learns where to look.
            return p.normal_(0.0, (t.d_model * t.d_kv) ** -0.5, generator=g)
        return p.normal_(0.0, p.shape[1] ** -0.5, generator=g)  # fan-in of nn.Linear weight (out, in)
    if name == "projector.weight":
        # The projector starts small so visual tokens do not swamp the text embeddings at step 0.
        return p.normal_(0.0, cfg.vision.width ** -0.5, generator=g)
    if "pos_embed" in name:
        return p.normal_(0.0, 0.02, generator=g)
    if p.dim() >= 2:
        return torch.nn.init.trunc_normal_(p, std=0.02, generator=g)
    raise ValueError(f"no initialisation rule for parameter {name!r} of shape {tuple(p.shape)}; "
                     "add one to pali.factory._fill_")


def init_tensor(cfg: PaLIConfig, name: str, shape: tuple[int, ...] | torch.Size, seed: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full initial value of one parameter of `create_model(cfg, seed=seed)`, generated alone.

    name: as in `PaLI.state_dict()`; shape: its full (unsharded) shape. Values are drawn in float32 on
    the CPU and cast to `dtype`, so `create_model(cfg, seed=seed).state_dict()[name]` equals this exactly.
    """
    full = _fill_(torch.empty(tuple(shape), dtype=torch.float32, device="cpu"), cfg, name, seed)
    return full if dtype == torch.float32 else full.to(dtype)


@torch.no_grad()
def init_weights(model: PaLI, seed: int | None = None) -> None:
    """T5-style init (normal with fan-in scaling) for text; ViT: trunc-normal, zero biases; norms at 1.

    Each parameter comes from its own generator (see `init_tensor`); seed=None draws the base seed from
    the global torch RNG.
    """
    if seed is None:
        # Explicitly on the CPU: under `with torch.device("meta")` a bare randint would be a meta tensor.
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), device="cpu").item())
    for name, p in model.named_parameters():
        if p.device.type == "cpu" and p.dtype == torch.float32:
            _fill_(p, model.cfg, name, seed)
        else:
            p.copy_(init_tensor(model.cfg, name, p.shape, seed))
