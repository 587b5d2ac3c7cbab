"""Import from and export to Hugging Face layouts (T5 / mT5 text, ViT / SigLIP vision).

Names map both ways by rule from our own module paths (`t5_name`, `vit_name`, `siglip_name`), so the
same table drives `from_hf` and `to_hf`. Weights load without pickle: safetensors (single or sharded),
else `pytorch_model.bin` through `torch.load(weights_only=True)`.

Output-head semantics follow the installed transformers (5.x): `T5ForConditionalGeneration` scales the
decoder output by d_model**-0.5 unless its config.json says `tie_word_embeddings: false`;
`MT5ForConditionalGeneration` never scales; a checkpoint whose `lm_head.weight` differs from
`shared.weight` keeps an untied head. Combinations our `TextConfig` cannot express (tied but unscaled,
untied but scaled) import as an untied head with the scale folded into it, which gives the same logits.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pali.config import PaLIConfig, TextConfig, VisionConfig, vit
from pali.factory import create_model
from pali.models.pali import PaLI
from pali.serving_checkpoint import load_state

_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_SIGLIP_TYPES = ("siglip_vision_model", "siglip", "siglip2_vision_model")


# --- files ---------------------------------------------------------------------------------------------

def read_config(model_dir: str | os.PathLike) -> dict:
    """A Hugging Face `config.json` as a dict; a missing file is an error naming the directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected a Hugging Face model directory with "
                                "config.json")
    return json.loads(path.read_text())


def load_weights(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory (safetensors, sharded or not, else .bin)."""
    d = Path(model_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        files = [d / single] if (d / single).is_file() else []
        if not files and (d / index_name).is_file():
            shards = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            files = [d / s for s in shards]
        if files:
            state: dict[str, torch.Tensor] = {}
            for f in files:
                if f.suffix == ".safetensors":
                    state.update(load_file(str(f)))
                else:
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


def vision_config_from_hf(hf: dict) -> VisionConfig:
    """`VisionConfig` from a ViTModel or SigLIP (vision or full) config.json."""
    mtype = hf.get("model_type", "vit")
    if mtype == "siglip":
        hf, mtype = hf.get("vision_config", {}), "siglip_vision_model"
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
        raise ValueError(f"vision model_type is {mtype!r}; expected 'vit' (ViTModel) or "
                         "'siglip_vision_model' / 'siglip' (SiglipVisionModel)")
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
    """config.json for the vision tower in its source layout (ViTModel or SiglipVisionModel)."""
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
        raise ValueError("vision layout 'siglip' has no class token; got class_token=True (use layout 'vit')")
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

def _take(src: dict[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in src:
        raise KeyError(f"{where} has no tensor {key!r}; expected a Hugging Face checkpoint of the layout its "
                       "config.json names")
    return src[key]


def text_state_from_hf(hf_state: dict[str, torch.Tensor], hf_config: dict, where: str = "text checkpoint"
                       ) -> tuple[TextConfig, dict[str, torch.Tensor]]:
    """(TextConfig, our `text.*` tensors) from a T5 / mT5 state dict, deciding head tying and scaling."""
    cfg = text_config_from_hf(hf_config)
    hf_state = {k.removeprefix("model."): v for k, v in hf_state.items()}
    if "shared.weight" not in hf_state and "encoder.embed_tokens.weight" in hf_state:
        hf_state["shared.weight"] = hf_state["encoder.embed_tokens.weight"]
    shared = _take(hf_state, "shared.weight", where)
    head = hf_state.get("lm_head.weight")
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
            out["text." + n] = _take(hf_state, t5_name(n), where)
    return cfg, out


def _text_param_names(cfg: TextConfig) -> list[str]:
    from pali.models.t5 import T5

    with torch.device("meta"):
        return list(T5(cfg).state_dict())


def vision_state_from_hf(hf_state: dict[str, torch.Tensor], hf_config: dict, where: str = "vision checkpoint"
                         ) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """(VisionConfig, our `vision_tower.*` tensors) from a ViTModel or SigLIP state dict."""
    cfg = vision_config_from_hf(hf_config)
    if cfg.layout == "vit":
        hf_state = {k.removeprefix("vit."): v for k, v in hf_state.items()}
        rename = vit_name
    else:  # a full SiglipModel (and transformers 4.x) prefixes the tower with `vision_model.`
        hf_state = {k.removeprefix("vision_model."): v for k, v in hf_state.items()}
        rename = siglip_name
    from pali.models.vit import ViT

    with torch.device("meta"):
        names = list(ViT(cfg).state_dict())
    out = {}
    for n in names:
        t = _take(hf_state, rename(n), where)
        if n == "pos_embed" and t.dim() == 2:  # SigLIP stores an nn.Embedding (N, D)
            t = t.unsqueeze(0)
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
    """Our vision tower as a Hugging Face ViTModel or SiglipVisionModel state dict."""
    layout = model.cfg.vision.layout
    rename = vit_name if layout == "vit" else siglip_name
    out = {}
    for n, t in model.vision_tower.state_dict().items():
        t = t.detach().cpu()
        if n == "pos_embed" and layout == "siglip":
            t = t[0]
        out[rename(n)] = t.contiguous().clone()
    return out


# --- public API --------------------------------------------------------------------------------------

def from_hf(text_dir: str | os.PathLike, vision_dir: str | os.PathLike | None = None,
            image_size: int | None = None, vision: str | VisionConfig = "B/16", freeze_vision: bool = False,
            dtype: torch.dtype = torch.float32, seed: int = 0, name: str = "hf-import",
            dropout_rate: float | None = None) -> PaLI:
    """PaLI from a local HF T5/mT5 directory and (optionally) a ViTModel / SigLIP directory.

    The projection is newly initialised (normal, std width**-0.5, zero bias, seeded by `seed`). Without
    `vision_dir` the vision tower is freshly initialised from `vision` (a ViT variant such as "So400m/14"
    or a `VisionConfig`). `image_size` runs the tower at another resolution by interpolating its position
    embeddings (e.g. a 224 px checkpoint at 448 px). `dropout_rate` replaces the text config's (mT5
    checkpoints say 0.1; PaLI pretraining uses 0); None keeps it.
    """
    text_hf = read_config(text_dir)
    text_config_from_hf(text_hf)  # a wrong model type fails before any weights are read
    text_cfg, state = text_state_from_hf(load_weights(text_dir), text_hf, where=str(text_dir))
    if vision_dir is not None:
        vision_hf = read_config(vision_dir)
        vision_config_from_hf(vision_hf)
        vis_cfg, vis_state = vision_state_from_hf(load_weights(vision_dir), vision_hf, where=str(vision_dir))
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
    """Export: `out_dir/text` (HF T5/mT5), `out_dir/vision` (ViTModel or SiglipVisionModel layout),
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
