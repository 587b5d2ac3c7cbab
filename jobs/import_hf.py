"""Build a PaLI serving checkpoint from local Hugging Face directories.

    python -m jobs.import_hf --text DIR --vision DIR --out CKPT [--image-size N]

`--text` is a T5 / mT5 (`T5ForConditionalGeneration` / `MT5ForConditionalGeneration`) directory,
`--vision` a `ViTModel`, `SiglipVisionModel` / `SiglipModel`, SigLIP 2 NaFlex (`Siglip2VisionModel` /
`Siglip2Model`) or PaliGemma (`PaliGemmaForConditionalGeneration`: its SigLIP tower only) directory (omit
it to start the vision tower from scratch with `--vision-variant`). The projection is newly initialised;
the tokenizer is the text model's `spiece.model` unless `--tokenizer` names another sentencepiece model.
"""

from __future__ import annotations

import argparse
import sys

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m jobs.import_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="local Hugging Face T5 / mT5 checkpoint directory")
    p.add_argument("--vision", default=None,
                   help="local ViTModel, SiglipVisionModel, Siglip2VisionModel or PaliGemma checkpoint directory")
    p.add_argument("--out", required=True, help="serving checkpoint directory to write (replaced atomically)")
    p.add_argument("--image-size", type=int, default=None,
                   help="run the vision tower at this resolution (position embeddings are interpolated)")
    p.add_argument("--max-num-patches", type=int, default=None,
                   help="NaFlex patch budget per image (default: the directory's preprocessor_config.json)")
    p.add_argument("--vision-variant", default="B/16",
                   help="ViT size for a freshly initialised tower when --vision is not given (e.g. So400m/14)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: DIR/spiece.model)")
    p.add_argument("--name", default="hf-import", help="name recorded in the checkpoint config")
    p.add_argument("--freeze-vision", action="store_true", help="record the vision tower as frozen")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weight dtype to store")
    p.add_argument("--seed", type=int, default=0, help="seed of the new projection")
    p.add_argument("--dropout-rate", type=float, default=None,
                   help="text dropout to record (default: the checkpoint's, 0.1 for mT5)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Import and write the checkpoint; prints the parameter counts."""
    from pali.hf import from_hf, load_hf_tokenizer
    from pali.serving_checkpoint import save_pretrained
    from pali.tokenizer import Tokenizer

    args = parse_args(argv)
    tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else load_hf_tokenizer(args.text)
    model = from_hf(args.text, args.vision, image_size=args.image_size, vision=args.vision_variant,
                    freeze_vision=args.freeze_vision, dtype=_DTYPES[args.dtype], seed=args.seed, name=args.name,
                    dropout_rate=args.dropout_rate, max_num_patches=args.max_num_patches)
    if len(tokenizer) > model.cfg.text.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids; expected at most the model's vocab_size "
                         f"{model.cfg.text.vocab_size}")
    out = save_pretrained(model, tokenizer, args.out)
    print(f"wrote {out}: vision {model.num_parameters('vision'):,} + text {model.num_parameters('text'):,} "
          f"parameters, {_vision_input(model.cfg.vision)}, tokenizer {len(tokenizer)} ids")
    return 0


def _vision_input(v) -> str:
    return f"NaFlex up to {v.max_num_patches} patches of {v.patch_size} px" if v.naflex \
        else f"image size {v.image_size}"


if __name__ == "__main__":
    sys.exit(main())
