"""Export a PaLI serving checkpoint to Hugging Face layouts.

    python -m jobs.export --checkpoint CKPT --out DIR

Writes DIR/text (T5 / mT5 layout: `MT5ForConditionalGeneration.from_pretrained(DIR/text)`, or
`T5ForConditionalGeneration` for a tied T5 v1.0 head; with `spiece.model`), DIR/vision (`ViTModel`,
`SiglipVisionModel` or `Siglip2VisionModel` with its preprocessor_config.json: the layout the tower came
from; a PaliGemma tower exports as the `SiglipVisionModel` it is), DIR/projector.safetensors and
DIR/pali_config.json.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="serving checkpoint directory (pali.save_pretrained)")
    p.add_argument("--out", required=True, help="output directory (text/ and vision/ are created in it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint and write the Hugging Face directories."""
    from pali.hf import to_hf
    from pali.serving_checkpoint import load_pretrained

    args = parse_args(argv)
    model, tokenizer = load_pretrained(args.checkpoint)
    out = to_hf(model, args.out, tokenizer)
    print(f"wrote {out}/text ({model.cfg.text.d_model}-d {'T5' if model.cfg.text.tie_word_embeddings else 'mT5'}) "
          f"and {out}/vision ({model.cfg.vision.layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
