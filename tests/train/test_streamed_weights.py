"""The driver never holds a whole model: `init_state` reads only a header, and `consolidate` writes the
serving checkpoint one tensor at a time. Measured as the peak resident memory of a fresh process
against the model's size (the weights are ~60 MB here; the largest tensor is ~2 MB)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

import pali
from pali.config import get_preset
from pali.parallel.tp_plan import ShardSpec
from pali.train import sharded_checkpoint as ck

MODEL = {"text__d_model": 256, "text__d_ff": 1536, "text__num_layers": 6, "text__num_decoder_layers": 6,
         "text__num_heads": 4, "text__d_kv": 64}

DRIVER = textwrap.dedent("""
    import json, resource, sys
    import torch
    from pali.config import PaLIConfig
    from pali.factory import create_model
    from pali.serving_checkpoint import load_config
    from pali.train.config import TrainConfig
    from pali.train.consolidation import consolidate, init_state
    from pali.tokenizer import Tokenizer

    ckpt, init_dir, out = sys.argv[1:4]
    mcfg = load_config(init_dir)
    create_model(mcfg, device="meta")  # what the driver builds anyway (imports, lazy modules warmed up)
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = peak()
    init_state(TrainConfig(init_from=init_dir), mcfg.with_overrides(vision__image_size=96))
    after_init = peak()
    consolidate(ckpt, out, None)
    print(json.dumps({"base": base, "init": after_init - base, "consolidate": peak() - after_init}))
""")


def test_driver_memory_stays_far_below_the_model_during_init_and_consolidation(tmp_path):
    cfg = get_preset("tiny").with_overrides(**MODEL)
    model = pali.create_model(cfg, seed=0)
    state = model.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    largest = max(t.numel() * t.element_size() for t in state.values())
    assert model_bytes > 50e6 and largest < model_bytes / 30
    from pali.tokenizer import Tokenizer

    tok = Tokenizer.train([f"word{i} thing{i % 7}" for i in range(400)], vocab_size=320, num_sentinels=10)
    pali.save_pretrained(model, tok, tmp_path / "init")  # an --init-from checkpoint
    specs = {k: ShardSpec(tuple(v.shape), None) for k, v in state.items()}
    meta = {"step": 3, "world_size": 1, "layout": {"dp": 1, "pp": 1, "tp": 1}, "model": cfg.to_dict()}
    ck.save_shard(tmp_path / "ckpt", 0, {"dp": 1, "pp": 1, "tp": 1}, specs, state, None, [], meta, tok)
    del model

    run = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "ckpt"), str(tmp_path / "init"),
                          str(tmp_path / "final")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    grew = json.loads(run.stdout.strip().splitlines()[-1])
    # Reading the whole model would add >= model_bytes; one tensor at a time adds a few of the largest.
    assert grew["init"] < 0.1 * model_bytes, grew
    assert grew["consolidate"] < 0.25 * model_bytes, (grew, model_bytes, largest)
    written = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert written.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(written[k], v), k
    assert json.loads((tmp_path / "final" / "config.json").read_text())["training"]["step"] == 3
