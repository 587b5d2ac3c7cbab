"""The PaLI architecture assembled from Hugging Face `transformers` modules: the baseline users would pick.

`MT5ForConditionalGeneration` (or `T5ForConditionalGeneration` for tied heads) driven through its
`inputs_embeds` path, a `SiglipVisionModel` or `ViTModel` tower and a `torch.nn.Linear` projector, with
weights exported from our model by `pali.hf.to_hf`, so both sides hold identical numbers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pali.hf import to_hf


class HFPaLI(nn.Module):
    """Vision tower -> projector -> visual tokens prepended to the prompt embeddings -> HF (m)T5."""

    def __init__(self, vision: nn.Module, projector: nn.Linear, t5: nn.Module, pad_token_id: int = 0):
        super().__init__()
        self.vision, self.projector, self.t5, self.pad_token_id = vision, projector, t5, pad_token_id

    def embed(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder inputs float[B, P+S, D] and mask int[B, P+S]."""
        vis = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, P, D_vit), after the final norm
        tok = self.projector(vis)  # (B, P, D)
        x = torch.cat([tok, self.t5.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([torch.ones(tok.shape[:2], dtype=attention_mask.dtype), attention_mask], dim=1)
        return x, mask

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor):
        """HF output (with `.loss`); pad labels are ignored like in `pali.models.pali.target_loss`."""
        x, mask = self.embed(pixel_values, input_ids, attention_mask)
        return self.t5(inputs_embeds=x, attention_mask=mask,
                       labels=labels.masked_fill(labels == self.pad_token_id, -100))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 **kw) -> torch.Tensor:
        """HF `generate` on the assembled inputs; returns its raw sequences (decoder start included)."""
        x, mask = self.embed(pixel_values, input_ids, attention_mask)
        return self.t5.generate(inputs_embeds=x, attention_mask=mask, **kw)


def hf_reference(model, workdir: str | Path | None = None) -> HFPaLI:
    """The HF-assembled twin of a PaLI model, loaded from a `to_hf` export (identical weights and config)."""
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import MT5ForConditionalGeneration, SiglipVisionModel, T5ForConditionalGeneration, ViTModel

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = to_hf(model, tmp)
        text_cfg = json.loads((out / "text" / "config.json").read_text())
        cls = MT5ForConditionalGeneration if text_cfg["model_type"] == "mt5" else T5ForConditionalGeneration
        t5 = cls.from_pretrained(out / "text")
        if model.cfg.vision.layout == "siglip":
            vision = SiglipVisionModel.from_pretrained(out / "vision")
        else:
            vision = ViTModel.from_pretrained(out / "vision", add_pooling_layer=False)
        proj = nn.Linear(model.cfg.vision.width, model.cfg.text.d_model)
        proj.load_state_dict(load_file(str(out / "projector.safetensors")))
    ref = HFPaLI(vision, proj, t5, model.cfg.text.pad_token_id)
    return ref.train(model.training)


def strip_hf(seqs: torch.Tensor, eos_id: int = 1, pad_id: int = 0) -> torch.Tensor:
    """HF sequences minus the decoder start token, everything after the first EOS set to pad (HF beam
    search fills finished rows with EOS, greedy with pad) — our `generate` output convention."""
    out = seqs[:, 1:].clone()
    for row in out:
        eos = (row == eos_id).nonzero()
        if len(eos):
            row[int(eos[0]) + 1:] = pad_id
    return out
