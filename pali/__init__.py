"""PaLI on Ray: multilingual vision-language models (ViT + mT5), trained and served with Ray.

Python API (docs/design.md "Contracts"):
    create_model(preset_or_config) -> PaLI
    from_hf(text_dir, vision_dir) -> PaLI
    load_pretrained(dir) -> (PaLI, Tokenizer)
    save_pretrained(model, tokenizer, dir)
"""

from pali.config import PaLIConfig, TextConfig, VisionConfig, get_preset
from pali.factory import create_model
from pali.models.pali import PaLI, PaLIOutput
from pali.serving_checkpoint import load_pretrained, save_pretrained


def from_hf(text_dir, vision_dir=None, **kw):
    """PaLI built from local Hugging Face T5/mT5 and ViT/SigLIP checkpoint directories (see `pali.hf`)."""
    from pali.hf import from_hf as _from_hf

    return _from_hf(text_dir, vision_dir, **kw)


__all__ = ["PaLI", "PaLIConfig", "PaLIOutput", "TextConfig", "VisionConfig", "create_model", "from_hf",
           "get_preset", "load_pretrained", "save_pretrained"]
