"""The TP plan, shard specs, slicing and merging: pure data, no process groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pali.factory import create_model
from pali.parallel import TP_PLAN, ShardSpec, apply_tp_plan, layout_specs, merge_shards, plan_style, slice_for


def test_plan_covers_every_block_linear_and_leaves_the_rest_replicated(tiny_config):
    model = create_model(tiny_config, device="meta")
    applied = apply_tp_plan(model, tp=1, tp_rank=0)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    block_linears = {n for n in linears if ".blocks." in n}
    assert block_linears <= set(applied), sorted(block_linears - set(applied))
    assert applied["text.shared"] == "vocab" and applied["text.lm_head"] == "colwise"
    assert applied["text.encoder.blocks.0.self_attn.relative_attention_bias"] == "heads"
    assert "text.encoder.blocks.1.self_attn.relative_attention_bias" not in applied  # only block 0 owns one
    assert plan_style("projector") is None and plan_style("vision_tower.patch_embed") is None
    assert plan_style("text.decoder.blocks.1.cross_attn.o") == "rowwise"
    assert plan_style("vision_tower.blocks.0.mlp.fc1") == "colwise"
    assert all(isinstance(v, str) for v in TP_PLAN.values())  # plain data


def test_tp2_layers_are_fairscale_with_half_sized_shards(tiny_config):
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    model = create_model(tiny_config, device="meta")
    apply_tp_plan(model, tp=2, tp_rank=1)
    attn = model.text.encoder.blocks[0].self_attn
    assert isinstance(attn.q, ColumnParallelLinear) and attn.q.weight.shape == (64, 128)
    assert isinstance(attn.o, RowParallelLinear) and attn.o.weight.shape == (128, 64)
    assert attn.relative_attention_bias.weight.shape == (32, 2)
    assert isinstance(model.text.shared, VocabParallelEmbedding)
    assert (model.text.shared.vocab_start_index, model.text.shared.vocab_end_index) == (1024, 2048)
    vit_o = model.vision_tower.blocks[0].attn.o
    assert vit_o.bias.shape == (96,) and vit_o.weight.shape == (96, 48)  # row-parallel bias stays whole


def test_layout_specs_split_dims_and_stage_cut(tiny_config):
    s0 = layout_specs(tiny_config, pp=2, tp=2, pp_rank=0, tp_rank=1)
    s1 = layout_specs(tiny_config, pp=2, tp=2, pp_rank=1, tp_rank=1)
    assert s0["text.encoder.blocks.0.self_attn.q.weight"] == ShardSpec((128, 128), 0, 1, 2)
    assert s0["vision_tower.blocks.0.attn.o.weight"] == ShardSpec((96, 96), 1, 1, 2)
    assert s0["vision_tower.blocks.0.attn.o.bias"] == ShardSpec((96,), None, 0, 1)
    assert s1["text.lm_head.weight"] == ShardSpec((2048, 128), 0, 1, 2)
    assert not any(n.startswith(("text.decoder", "text.lm_head")) for n in s0)
    assert not any(n.startswith(("vision_tower", "projector", "text.encoder")) for n in s1)
    assert "text.shared.weight" in s0 and "text.shared.weight" in s1  # both stages embed tokens
    full = set(create_model(tiny_config, device="meta").state_dict())
    assert set(s0) | set(s1) == full


@pytest.mark.parametrize("override,msg", [
    ({"text__num_heads": 3, "text__d_kv": 32}, "text.num_heads=3"),
    ({"vision__num_heads": 3, "vision__width": 96}, "vision.num_heads=3"),
    ({"text__vocab_size": 2047}, "text.vocab_size=2047"),
    ({"text__d_ff": 255}, "text.d_ff=255"),
])
def test_indivisible_sizes_are_refused_by_name(tiny_config, override, msg):
    with pytest.raises(ValueError, match=msg.replace(".", r"\.")):
        layout_specs(tiny_config.with_overrides(**override), tp=2)


def test_tied_head_and_unsupported_pipeline_degree_are_refused(tiny_config):
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        layout_specs(tiny_config.with_overrides(text__tie_word_embeddings=True), tp=2)
    assert "text.shared.weight" in layout_specs(tiny_config.with_overrides(text__tie_word_embeddings=True))
    with pytest.raises(ValueError, match="pp=5 puts 3 stages on the encoder but it has only 2 blocks"):
        layout_specs(tiny_config, pp=5)  # tiny has 2 encoder and 2 decoder blocks
    with pytest.raises(ValueError, match="pp=9 has no stage cut"):
        layout_specs(tiny_config, pp=9)


@pytest.mark.parametrize("pp", [3, 4])
def test_deep_pipelines_spread_blocks_and_keep_names(tiny_config, pp):
    stages = [layout_specs(tiny_config, pp=pp, pp_rank=s) for s in range(pp)]
    full = set(create_model(tiny_config, device="meta").state_dict())
    assert set().union(*stages) == full
    owners = {n: [s for s, specs in enumerate(stages) if n in specs] for n in full}
    assert owners["text.shared.weight"] == [0, (pp + 1) // 2]  # the two embedding holders
    assert all(len(o) == 1 for n, o in owners.items() if n != "text.shared.weight")
    assert owners["text.encoder.blocks.1.mlp.wo.weight"] == [1]
    assert owners["text.lm_head.weight"] == [pp - 1] and owners["vision_tower.pos_embed"] == [0]


def test_plan_must_match_and_model_must_be_meta(tiny_config):
    with pytest.raises(ValueError, match="match no module"):
        apply_tp_plan(create_model(tiny_config, device="meta"), 2, 0, {**TP_PLAN, "text.nothing.*": "colwise"})
    with pytest.raises(ValueError, match="meta device"):
        apply_tp_plan(create_model(tiny_config), 2, 0)


@pytest.mark.parametrize("tp", [2, 4])
def test_slice_then_merge_is_exact(tiny_config, tp):
    full = create_model(tiny_config, seed=1).state_dict()
    shards = [(specs, slice_for(full, specs)) for specs in
              (layout_specs(tiny_config, pp=2, tp=tp, pp_rank=s, tp_rank=r) for s in (0, 1) for r in range(tp))]
    merged = merge_shards(shards)
    assert set(merged) == set(full) and all(torch.equal(merged[n], full[n]) for n in full)
    q = shards[1][1]["text.encoder.blocks.0.self_attn.q.weight"]  # stage 0, tp_rank 1
    assert torch.equal(q, full["text.encoder.blocks.0.self_attn.q.weight"].chunk(tp)[1])
    q.zero_()  # shards are copies, never views of the caller's tensors
    assert full["text.encoder.blocks.0.self_attn.q.weight"].abs().sum() > 0


def test_merge_and_slice_name_what_is_wrong(tiny_config):
    full = create_model(tiny_config, seed=1).state_dict()
    specs = layout_specs(tiny_config, tp=2, tp_rank=0)
    with pytest.raises(ValueError, match=r"text\.shared\.weight: TP chunks \[1\] of 2 are missing"):
        merge_shards([(specs, {"text.shared.weight": slice_for(full, specs)["text.shared.weight"]})])
    with pytest.raises(ValueError, match=r"text\.shared\.weight is \(5, 128\); expected the full shape"):
        slice_for({**full, "text.shared.weight": torch.zeros(5, 128)}, specs)
    with pytest.raises(KeyError, match="lacks"):
        slice_for({}, specs)
    assert ShardSpec.from_dict(specs["text.shared.weight"].to_dict()) == specs["text.shared.weight"]
