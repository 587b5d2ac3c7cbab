"""Import from and export to Hugging Face layouts (T5 / mT5 text; ViT, SigLIP, SigLIP 2 NaFlex and
PaliGemma's SigLIP vision).

Names map both ways by rule from our own module paths (`t5_name`, `vit_name`, `siglip_name`), so the
same table drives `from_hf` and `to_hf`. Weights load without pickle: safetensors (single or sharded,
read one tensor at a time, so importing the 0.4B-parameter tower of a 3B PaliGemma checkpoint reads only
the tower), else `pytorch_model.bin` through `torch.load(weights_only=True)`.

Output-head semantics follow the installed transformers (5.x): `T5ForConditionalGeneration` scales the
decoder output by d_model**-0.5 unless its config.json says `tie_word_embeddings: false`;
`MT5ForConditionalGeneration` never scales; a checkpoint whose `lm_head.weight` differs from
`shared.weight` keeps an untied head. Combinations our `TextConfig` cannot express (tied but unscaled,
untied but scaled) import as an untied head with the scale folded into it, which gives the same logits.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pali.config import PaLIConfig, TextConfig, VisionConfig, vit
from pali.factory import create_model
from pali.models.pali import PaLI
from pali.serving_checkpoint import load_state
from pali.storage import ReadOnAccess

_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_SIGLIP_TYPES = ("siglip_vision_model", "siglip")
_SIGLIP2_TYPES = ("siglip2_vision_model", "siglip2")
# Prefixes in front of the tower's own names: a full SiglipModel / Siglip2Model (and transformers 4.x)
# holds it under `vision_model.`, PaliGemma under `vision_tower.` (transformers 5) or
# `vision_tower.vision_model.` / `model.vision_tower.vision_model.` (4.x checkpoints on the hub).
_TOWER_PREFIXES = ("model.", "vision_tower.", "vision_model.")


# --- files ---------------------------------------------------------------------------------------------

def read_config(model_dir: str | os.PathLike) -> dict:
    """A Hugging Face `config.json` as a dict; a missing file is an error naming the directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected a Hugging Face model directory with "
                                "config.json")
    return json.loads(path.read_text())


class LazyWeights(ReadOnAccess):
    """The tensors of safetensors files as a read-only mapping that reads a tensor only when it is indexed.

    Keys come from the shard index (or the single file's header); `reads` counts the tensors read.
    """

    def __init__(self, files: dict[str, Path]):
        self.files = files  # tensor name -> file holding it
        self.reads = 0

    @classmethod
    def open(cls, paths: list[Path]) -> LazyWeights:
        """A mapping over the tensors of these safetensors files (headers are read, tensors are not)."""
        files: dict[str, Path] = {}
        for f in paths:
            with safe_open(str(f), framework="pt") as h:
                files.update(dict.fromkeys(h.keys(), f))
        return cls(files)

    @property
    def names(self) -> Collection[str]:
        return self.files

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self.files[key]), framework="pt") as h:
            self.reads += 1
            return h.get_tensor(key)


def load_weights(model_dir: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint directory: safetensors (sharded or not) as a `LazyWeights`
    that reads each tensor when it is asked for, else a .bin state dict (read whole)."""
    d = Path(model_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        files = [d / single] if (d / single).is_file() else []
        if not files and (d / index_name).is_file():
            shards = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            files = [d / s for s in shards]
        if files:
            if files[0].suffix == ".safetensors":
                return LazyWeights.open(files)
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
            return state
    raise FileNotFoundError(f"no weights in {d}; expected model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin or pytorch_model.bin.index.json")


# --- configs -------------------------------------------------------------------------------------------

def text_config_from_hf(hf: dict) -> TextConfig:
    """`TextConfig` from a T5 / mT5 config.json (head tying is decided later from the weights)."""
    mtype = hf.get("model_type", "t5")
    if mtype not in ("t5", "mt5"):
        raise ValueError(f"text model_type is {mtype!r}; expected 't5' or 'mt5' (T5ForConditionalGeneration "
                         "or MT5ForConditionalGeneration layout)")
    ffp = hf.get("feed_forward_proj", "gated-gelu" if mtype == "mt5" else "relu")
    if ffp not in ("gated-gelu", "relu"):
        raise ValueError(f"feed_forward_proj is {ffp!r}; expected 'gated-gelu' (T5 v1.1 / mT5) or "
                         "'relu' (T5 v1.0)")
    n_layers = hf.get("num_layers", 8 if mtype == "mt5" else 6)
    return TextConfig(
        vocab_size=hf.get("vocab_size", 250112 if mtype == "mt5" else 32128),
        d_model=hf.get("d_model", 512), d_kv=hf.get("d_kv", 64),
        d_ff=hf.get("d_ff", 1024 if mtype == "mt5" else 2048),
        num_heads=hf.get("num_heads", 6 if mtype == "mt5" else 8),
        num_layers=n_layers, num_decoder_layers=hf.get("num_decoder_layers") or n_layers,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        feed_forward_proj=ffp, tie_word_embeddings=False,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), dropout_rate=hf.get("dropout_rate", 0.1),
        pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
        eos_token_id=_first(hf.get("eos_token_id", 1)),
        decoder_start_token_id=hf.get("decoder_start_token_id", 0) or 0,
    )


def _first(x) -> int:
    return int(x[0] if isinstance(x, list) else x)


def vision_config_from_hf(hf: dict, max_num_patches: int | None = None) -> VisionConfig:
    """`VisionConfig` from a ViTModel, SigLIP, SigLIP 2 (vision or full) or PaliGemma config.json.

    PaliGemma: its `vision_config` (a SigLIP tower; the Gemma decoder and projector are not used).
    SigLIP 2 (`Siglip2VisionModel`): a NaFlex tower whose square position grid holds `num_patches`;
    `max_num_patches` is the patch budget (the checkpoint's preprocessor_config.json; default num_patches).
    """
    mtype = hf.get("model_type", "vit")
    if mtype == "paligemma":
        vc = dict(hf.get("vision_config") or {})
        if "image_size" not in vc and "num_image_tokens" in vc:  # hub configs give the token count only
            vc["image_size"] = math.isqrt(vc["num_image_tokens"]) * vc.get("patch_size", 16)
        hf, mtype = vc, "siglip_vision_model"
    if mtype in ("siglip", "siglip2"):
        hf, mtype = hf.get("vision_config", {}), mtype + ("_vision_model")
    if mtype == "siglip2_vision_model":
        return _siglip2_config(hf, max_num_patches)
    if mtype == "vit":
        defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, num_channels=3, hidden_act="gelu",
                        layer_norm_eps=1e-12)
        if not hf.get("qkv_bias", True):
            raise ValueError("ViT config has qkv_bias=false; expected true (biased q/k/v projections)")
    elif mtype in _SIGLIP_TYPES:
        defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6)
    else:
        raise ValueError(f"vision model_type is {mtype!r}; expected 'vit' (ViTModel), "
                         "'siglip_vision_model' / 'siglip' (SiglipVisionModel), 'siglip2_vision_model' / "
                         "'siglip2' (Siglip2VisionModel, NaFlex) or 'paligemma' (its SigLIP tower)")
    c = {**defaults, **{k: v for k, v in hf.items() if k in defaults}}
    act = c["hidden_act"]
    if act not in _ACTIVATIONS:
        raise ValueError(f"vision hidden_act is {act!r}; expected one of {sorted(_ACTIVATIONS)}")
    is_vit = mtype == "vit"
    return VisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
                        depth=c["num_hidden_layers"], mlp_dim=c["intermediate_size"],
                        num_heads=c["num_attention_heads"], channels=c["num_channels"],
                        layer_norm_eps=c["layer_norm_eps"], activation=_ACTIVATIONS[act], class_token=is_vit,
                        layout="vit" if is_vit else "siglip")


def _siglip2_config(hf: dict, max_num_patches: int | None) -> VisionConfig:
    c = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_channels": 3, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
         "num_patches": 256}
    c.update({k: v for k, v in hf.items() if k in c})
    grid = math.isqrt(c["num_patches"])
    if grid * grid != c["num_patches"]:
        raise ValueError(f"Siglip2 num_patches is {c['num_patches']}; expected a square (the position grid)")
    if c["hidden_act"] not in _ACTIVATIONS:
        raise ValueError(f"vision hidden_act is {c['hidden_act']!r}; expected one of {sorted(_ACTIVATIONS)}")
    return VisionConfig(image_size=grid * c["patch_size"], patch_size=c["patch_size"], width=c["hidden_size"],
                        depth=c["num_hidden_layers"], mlp_dim=c["intermediate_size"],
                        num_heads=c["num_attention_heads"], channels=c["num_channels"],
                        layer_norm_eps=c["layer_norm_eps"], activation=_ACTIVATIONS[c["hidden_act"]],
                        layout="siglip2", naflex=True, max_num_patches=max_num_patches or c["num_patches"])


def read_max_num_patches(model_dir: str | os.PathLike) -> int | None:
    """The NaFlex patch budget of a SigLIP 2 directory's preprocessor_config.json, None without one."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("max_num_patches")


def text_config_to_hf(t: TextConfig) -> dict:
    """config.json for the text tower: T5 (tied, scaled head, v1.0) or mT5 (untied head)."""
    mtype = "t5" if t.tie_word_embeddings else "mt5"
    return {
        "architectures": ["T5ForConditionalGeneration" if mtype == "t5" else "MT5ForConditionalGeneration"],
        "model_type": mtype, "vocab_size": t.vocab_size, "d_model": t.d_model, "d_kv": t.d_kv, "d_ff": t.d_ff,
        "num_heads": t.num_heads, "num_layers": t.num_layers, "num_decoder_layers": t.num_decoder_layers,
        "relative_attention_num_buckets": t.relative_attention_num_buckets,
        "relative_attention_max_distance": t.relative_attention_max_distance,
        "feed_forward_proj": t.feed_forward_proj, "tie_word_embeddings": t.tie_word_embeddings,
        "layer_norm_epsilon": t.layer_norm_epsilon, "dropout_rate": t.dropout_rate,
        "is_encoder_decoder": True, "pad_token_id": t.pad_token_id, "eos_token_id": t.eos_token_id,
        "decoder_start_token_id": t.decoder_start_token_id, "initializer_factor": 1.0, "use_cache": True,
    }


def vision_config_to_hf(v: VisionConfig) -> dict:
    """config.json for the vision tower in its source layout (ViTModel, SiglipVisionModel or
    Siglip2VisionModel; PaliGemma's tower exports as the SiglipVisionModel it is)."""
    act = "gelu" if v.activation == "gelu" else "gelu_pytorch_tanh"
    common = {"hidden_size": v.width, "num_hidden_layers": v.depth, "intermediate_size": v.mlp_dim,
              "num_attention_heads": v.num_heads, "num_channels": v.channels, "image_size": v.image_size,
              "patch_size": v.patch_size, "hidden_act": act, "layer_norm_eps": v.layer_norm_eps}
    if v.layout == "vit":
        if not v.class_token:
            raise ValueError("vision layout 'vit' needs class_token=True to export as ViTModel; got False")
        return {"architectures": ["ViTModel"], "model_type": "vit", "qkv_bias": True,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **common}
    if v.class_token:
        raise ValueError(f"vision layout {v.layout!r} has no class token; got class_token=True (use layout 'vit')")
    if v.layout == "siglip2" or v.naflex:
        if not (v.layout == "siglip2" and v.naflex):
            raise ValueError(f"vision layout {v.layout!r} with naflex={v.naflex}; expected layout 'siglip2' "
                             "exactly when naflex=True (Siglip2VisionModel)")
        common.pop("image_size")
        return {"architectures": ["Siglip2VisionModel"], "model_type": "siglip2_vision_model",
                "attention_dropout": 0.0, "vision_use_head": False, "num_patches": v.pos_grid ** 2, **common}
    return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "attention_dropout": 0.0, "vision_use_head": False, **common}


# --- names -------------------------------------------------------------------------------------------

_T5_PARTS = {
    "encoder": {"norm1": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
                "norm2": "layer.1.layer_norm", "mlp": "layer.1.DenseReluDense"},
    "decoder": {"norm1": "layer.0.layer_norm", "self_attn": "layer.0.SelfAttention",
                "norm2": "layer.1.layer_norm", "cross_attn": "layer.1.EncDecAttention",
                "norm3": "layer.2.layer_norm", "mlp": "layer.2.DenseReluDense"},
}
_VIT_PARTS = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.q": "attention.attention.query",
              "attn.k": "attention.attention.key", "attn.v": "attention.attention.value",
              "attn.o": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_SIGLIP_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.q": "self_attn.q_proj",
                 "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj", "attn.o": "self_attn.out_proj",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def t5_name(name: str) -> str:
    """Our `T5` parameter name (without the `text.` prefix) -> Hugging Face T5 name."""
    if name in ("shared.weight", "lm_head.weight"):
        return name
    m = re.match(r"^(encoder|decoder)\.final_norm\.weight$", name)
    if m:
        return f"{m[1]}.final_layer_norm.weight"
    m = re.match(r"^(encoder|decoder)\.blocks\.(\d+)\.(\w+)\.(.+)$", name)
    if m and m[3] in _T5_PARTS[m[1]]:
        return f"{m[1]}.block.{m[2]}.{_T5_PARTS[m[1]][m[3]]}.{m[4]}"
    raise KeyError(f"no Hugging Face T5 name for {name!r}")


def _vision_name(name: str, parts: dict[str, str], layer: str, fixed: dict[str, str]) -> str:
    if name in fixed:
        return fixed[name]
    m = re.match(r"^blocks\.(\d+)\.(norm1|norm2|attn\.[qkvo]|mlp\.fc[12])\.(weight|bias)$", name)
    if m:
        return f"{layer}.{m[1]}.{parts[m[2]]}.{m[3]}"
    raise KeyError(f"no Hugging Face vision name for {name!r}")


def vit_name(name: str) -> str:
    """Our `ViT` parameter name (without `vision_tower.`) -> Hugging Face `ViTModel` name."""
    fixed = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
             "final_norm.weight": "layernorm.weight", "final_norm.bias": "layernorm.bias"}
    return _vision_name(name, _VIT_PARTS, "encoder.layer", fixed)


def siglip_name(name: str) -> str:
    """Our `ViT` parameter name (without `vision_tower.`) -> Hugging Face `SiglipVisionModel` name."""
    fixed = {"pos_embed": "embeddings.position_embedding.weight",
             "patch_embed.weight": "embeddings.patch_embedding.weight",
             "patch_embed.bias": "embeddings.patch_embedding.bias",
             "final_norm.weight": "post_layernorm.weight", "final_norm.bias": "post_layernorm.bias"}
    return _vision_name(name, _SIGLIP_PARTS, "encoder.layers", fixed)


# --- state conversion ------------------------------------------------------------------------------

def _take(src: Mapping[str, torch.Tensor], key: str, where: str, names: dict[str, str] | None = None
          ) -> torch.Tensor:
    """src[names[key]] (names: stripped name -> stored name), or a KeyError naming the missing tensor."""
    stored = key if names is None else names.get(key)
    if stored is None or stored not in src:
        raise KeyError(f"{where} has no tensor {key!r}; expected a Hugging Face checkpoint of the layout its "
                       "config.json names")
    return src[stored]


def _strip(keys, prefixes: tuple[str, ...]) -> dict[str, str]:
    """Stripped name -> stored name, removing each of `prefixes` in turn where present (names only: no
    tensor is read)."""
    out = {}
    for k in keys:
        n = k
        for p in prefixes:
            n = n.removeprefix(p)
        out.setdefault(n, k)
    return out


def text_state_from_hf(hf_state: Mapping[str, torch.Tensor], hf_config: dict, where: str = "text checkpoint"
                       ) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """(TextConfig, our `text.*` tensors) from a T5 / mT5 state dict, deciding head tying and scaling."""
    cfg = text_config_from_hf(hf_config)
    keys = _strip(hf_state, ("model.",))
    if "shared.weight" not in keys and "encoder.embed_tokens.weight" in keys:
        keys["shared.weight"] = keys["encoder.embed_tokens.weight"]
    shared = _take(hf_state, "shared.weight", where, keys)
    head = hf_state[keys["lm_head.weight"]] if "lm_head.weight" in keys else None
    has_head = head is not None and not torch.equal(head, shared)
    # transformers 5.x: T5 scales unless config.json says tie_word_embeddings=false; mT5 never scales.
    scaled = (hf_config.get("model_type", "t5") == "t5"
              and hf_config.get("tie_word_embeddings", True) is not False)
    cfg.tie_word_embeddings = scaled and not has_head
    names = _text_param_names(cfg)
    out: dict[str, torch.Tensor] = {}
    for n in names:
        if n == "lm_head.weight":
            w = head if head is not None else shared
            # a fresh tensor: sharing storage with `shared` would tie them by accident (and safetensors
            # refuses to save shared tensors)
            out["text." + n] = w * cfg.d_model ** -0.5 if scaled else w.clone()
        else:
            out["text." + n] = _take(hf_state, t5_name(n), where, keys)
    return cfg, out


def _text_param_names(cfg: TextConfig) -> list[str]:
    from pali.models.t5 import T5

    with torch.device("meta"):
        return list(T5(cfg).state_dict())


def vision_state_from_hf(hf_state: Mapping[str, torch.Tensor], hf_config: dict, where: str = "vision checkpoint",
                         max_num_patches: int | None = None) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(VisionConfig, our `vision_tower.*` tensors) from a ViTModel, SigLIP, SigLIP 2 or PaliGemma state
    dict; with a `LazyWeights` only the tower's tensors are read."""
    cfg = vision_config_from_hf(hf_config, max_num_patches)
    if cfg.layout == "vit":
        keys, rename = _strip(hf_state, ("vit.",)), vit_name
    else:
        keys, rename = _strip(hf_state, _TOWER_PREFIXES), siglip_name
    from pali.models.vit import ViT

    with torch.device("meta"):
        names = list(ViT(cfg).state_dict())
    out = {}
    for n in names:
        t = _take(hf_state, rename(n), where, keys)
        if n == "pos_embed" and t.dim() == 2:  # SigLIP stores an nn.Embedding (N, D)
            t = t.unsqueeze(0)
        if n == "patch_embed.weight" and t.dim() == 2:  # SigLIP 2: a Linear over (row, col, channel) patches
            p, c = cfg.patch_size, cfg.channels
            t = t.reshape(t.shape[0], p, p, c).permute(0, 3, 1, 2).contiguous()  # our conv layout [W, C, p, p]
        out["vision_tower." + n] = t
    return cfg, out


def text_state_to_hf(model: PaLI) -> dict[str, torch.Tensor]:
    """Our text tower as a Hugging Face T5 / mT5 state dict (fresh contiguous tensors)."""
    out = {}
    for n, t in model.text.state_dict().items():
        out[t5_name(n)] = t.detach().cpu().contiguous().clone()
    # encoder/decoder.embed_tokens are tied to `shared` on load; storing copies would add 2 x V x d.
    return out


def vision_state_to_hf(model: PaLI) -> dict[str, torch.Tensor]:
    """Our vision tower as a Hugging Face ViTModel, SiglipVisionModel or Siglip2VisionModel state dict."""
    layout = model.cfg.vision.layout
    rename = vit_name if layout == "vit" else siglip_name
    out = {}
    for n, t in model.vision_tower.state_dict().items():
        t = t.detach().cpu()
        if n == "pos_embed" and layout != "vit":
            t = t[0]
        if n == "patch_embed.weight" and layout == "siglip2":  # [W, C, p, p] -> Linear over (p, p, C)
            t = t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
        out[rename(n)] = t.contiguous().clone()
    return out


# --- public API --------------------------------------------------------------------------------------

def from_hf(text_dir: str | os.PathLike, vision_dir: str | os.PathLike | None = None,
            image_size: int | None = None, vision: str | VisionConfig = "B/16", freeze_vision: bool = False,
            dtype: torch.dtype = torch.float32, seed: int = 0, name: str = "hf-import",
            dropout_rate: float | None = None, max_num_patches: int | None = None) -> PaLI:
    """PaLI from a local HF T5/mT5 directory and (optionally) a vision directory: ViTModel, SigLIP
    (vision or full), SigLIP 2 NaFlex (`Siglip2VisionModel` / `Siglip2Model`) or PaliGemma (its SigLIP
    tower only; the Gemma decoder and the multimodal projector are not read).

    The projection is newly initialised (normal, std width**-0.5, zero bias, seeded by `seed`). Without
    `vision_dir` the vision tower is freshly initialised from `vision` (a ViT variant such as "So400m/14"
    or a `VisionConfig`). `image_size` runs the tower at another resolution by interpolating its position
    embeddings (e.g. a 224 px checkpoint at 448 px). `dropout_rate` replaces the text config's (mT5
    checkpoints say 0.1; PaLI pretraining uses 0); None keeps it. `max_num_patches`: a NaFlex tower's
    patch budget (default: the directory's preprocessor_config.json, else the position grid's size).
    """
    text_hf = read_config(text_dir)
    text_config_from_hf(text_hf)  # a wrong model type fails before any weights are read
    text_cfg, state = text_state_from_hf(load_weights(text_dir), text_hf, where=str(text_dir))
    if vision_dir is not None:
        vision_hf = read_config(vision_dir)
        budget = read_max_num_patches(vision_dir) if max_num_patches is None else max_num_patches
        vision_config_from_hf(vision_hf, budget)
        vis_cfg, vis_state = vision_state_from_hf(load_weights(vision_dir), vision_hf, where=str(vision_dir),
                                                  max_num_patches=budget)
        state.update(vis_state)
    else:
        vis_cfg = vision if isinstance(vision, VisionConfig) else vit(vision, image_size or 224)
        stub = TextConfig(vocab_size=8, d_model=8, d_kv=8, d_ff=8, num_heads=1, num_layers=0,
                          num_decoder_layers=0)
        fresh = create_model(PaLIConfig(vision=vis_cfg, text=stub), seed=seed)
        state.update({"vision_tower." + k: v for k, v in fresh.vision_tower.state_dict().items()})
    if dropout_rate is not None:
        text_cfg.dropout_rate = dropout_rate
    cfg = PaLIConfig(name=name, vision=vis_cfg, text=text_cfg, freeze_vision=freeze_vision)
    gen = torch.Generator().manual_seed(seed)
    proj_w = torch.randn(text_cfg.d_model, vis_cfg.width, generator=gen) * vis_cfg.width ** -0.5
    state["projector.weight"], state["projector.bias"] = proj_w, torch.zeros(text_cfg.d_model)
    model = create_model(cfg, device="meta")
    load_state(model, {k: v.to(dtype) for k, v in state.items()}, source=f"{text_dir} + {vision_dir}")
    if image_size is not None and image_size != cfg.vision.image_size:
        model.set_image_size(image_size)
    if freeze_vision:
        model.freeze_vision()
    return model.eval()


def to_hf(model: PaLI, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Export: `out_dir/text` (HF T5/mT5), `out_dir/vision` (ViTModel, SiglipVisionModel or
    Siglip2VisionModel layout, NaFlex with its preprocessor_config.json),
    `out_dir/projector.safetensors` and `out_dir/pali_config.json`; `text/spiece.model` when a tokenizer
    is given. Returns `out_dir`."""
    out = Path(out_dir)
    text_dir, vision_dir = out / "text", out / "vision"
    vis_cfg = vision_config_to_hf(model.cfg.vision)  # validates the layout before anything is written
    for d, cfg, state in ((text_dir, text_config_to_hf(model.cfg.text), text_state_to_hf(model)),
                          (vision_dir, vis_cfg, vision_state_to_hf(model))):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    v = model.cfg.vision
    if v.naflex:  # the patch budget travels as SigLIP 2's processor config, which import reads back
        (vision_dir / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "Siglip2ImageProcessor", "patch_size": v.patch_size,
             "max_num_patches": v.max_num_patches, "do_resize": True, "do_rescale": True,
             "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
             "resample": 2}, indent=2, sort_keys=True))
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.projector.state_dict().items()},
              str(out / "projector.safetensors"), metadata={"format": "pt"})
    (out / "pali_config.json").write_text(model.cfg.to_json())
    if tokenizer is not None:
        tokenizer.save(text_dir / "spiece.model")
    return out


def load_hf_tokenizer(text_dir: str | os.PathLike):
    """The text model's sentencepiece tokenizer (`spiece.model`, else `tokenizer.model`) as a `Tokenizer`."""
    from pali.tokenizer import Tokenizer

    for name in ("spiece.model", "tokenizer.model"):
        p = Path(text_dir) / name
        if p.is_file():
            return Tokenizer.load(p)
    raise FileNotFoundError(f"{text_dir} has no spiece.model or tokenizer.model; expected the sentencepiece "
                            "model next to the weights (or pass --tokenizer)")
