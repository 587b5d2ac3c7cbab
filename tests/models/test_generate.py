"""Decoding: KV cache vs recomputation, beam search, sampling filters, EOS handling, argument errors."""

from __future__ import annotations

import pytest
import torch

from pali.models.generate import _beam_search, filter_logits


def test_cached_greedy_equals_uncached(eos_model, make_batch):
    px, ids, mask = make_batch(eos_model.cfg, b=4)
    cached = eos_model.generate(px, ids, mask, max_new_tokens=10)
    uncached = eos_model.generate(px, ids, mask, max_new_tokens=10, use_cache=False)
    assert torch.equal(cached, uncached)
    # The batch mixes early EOS and sequences that run to max_new_tokens, so both paths are exercised.
    assert cached.shape[1] == 10
    assert (cached == eos_model.cfg.text.eos_token_id).any(1).sum() in (1, 2, 3)


def test_cached_beam_equals_uncached(eos_model, make_batch):
    px, ids, mask = make_batch(eos_model.cfg, b=3)
    a = eos_model.generate(px, ids, mask, max_new_tokens=6, num_beams=3)
    b = eos_model.generate(px, ids, mask, max_new_tokens=6, num_beams=3, use_cache=False)
    assert torch.equal(a, b)


def test_greedy_matches_teacher_forced_argmax(tiny_model, make_batch):
    """Each greedy token is the argmax of a full (teacher-forced) forward over the tokens before it."""
    px, ids, mask = make_batch(tiny_model.cfg, b=2)
    out = tiny_model.generate(px, ids, mask, max_new_tokens=5)
    start = torch.zeros_like(out[:, :1])
    with torch.no_grad():
        logits = tiny_model(px, ids, mask, decoder_input_ids=torch.cat([start, out[:, :-1]], 1)).logits
    assert torch.equal(logits.argmax(-1), out)


def test_beam_size_one_equals_greedy(eos_model, make_batch):
    px, ids, mask = make_batch(eos_model.cfg, b=4)
    greedy = eos_model.generate(px, ids, mask, max_new_tokens=8)
    assert torch.equal(eos_model.generate(px, ids, mask, max_new_tokens=8, num_beams=1), greedy)
    # The beam-search code path itself with one beam: without a length bonus (length_penalty=0) a
    # finished hypothesis can never be beaten by its lower-scoring continuation, so it is greedy.
    enc, enc_mask = eos_model.encode(px, ids, mask)
    with torch.no_grad():
        beam = _beam_search(eos_model, enc, enc_mask, 8, 1, 0.0, True)
    assert torch.equal(beam, greedy)


def test_beam_search_scores_at_least_greedy(eos_model, make_batch):
    """With length_penalty=0 the beam's best hypothesis has log-prob >= the greedy sequence's."""
    px, ids, mask = make_batch(eos_model.cfg, b=3)

    def logprob(seq):
        start = torch.zeros_like(seq[:, :1])
        with torch.no_grad():
            lp = eos_model(px, ids, mask, decoder_input_ids=torch.cat([start, seq[:, :-1]], 1)).logits
        lp = lp.log_softmax(-1).gather(2, seq[:, :, None])[:, :, 0]
        # count tokens up to and including EOS (pad after it is not part of the hypothesis)
        eos = (seq == 1).int()
        after = (eos.cumsum(1) - eos) > 0
        return lp.masked_fill(after, 0).sum(1)

    greedy = eos_model.generate(px, ids, mask, max_new_tokens=6)
    beam = eos_model.generate(px, ids, mask, max_new_tokens=6, num_beams=4, length_penalty=0.0)
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()


def test_stops_at_eos_and_pads_after(eos_model, make_batch):
    px, ids, mask = make_batch(eos_model.cfg, b=4)
    eos, pad = eos_model.cfg.text.eos_token_id, eos_model.cfg.text.pad_token_id
    for kw in ({}, {"num_beams": 3}, {"do_sample": True, "generator": torch.Generator().manual_seed(1)}):
        out = eos_model.generate(px, ids, mask, max_new_tokens=10, **kw)
        assert out.shape[0] == 4 and out.shape[1] <= 10
        for row in out.tolist():
            if eos in row:
                k = row.index(eos)
                assert all(t == pad for t in row[k + 1:]), (kw, row)
            assert pad not in row[: row.index(eos) if eos in row else len(row)], (kw, row)


def test_generation_ends_when_all_rows_finished(eos_model, make_batch):
    px, ids, mask = make_batch(eos_model.cfg, b=4)
    eos = eos_model.cfg.text.eos_token_id
    stops = (eos_model.generate(px, ids, mask, max_new_tokens=10) == eos).any(1)  # rows that end early
    assert 1 <= int(stops.sum()) <= 3
    out = eos_model.generate(px[stops], ids[stops], mask[stops], max_new_tokens=20)
    assert out.shape[1] < 20 and (out == eos).any(1).all()


def test_sampling_reproducible_with_generator(tiny_model, make_batch):
    px, ids, mask = make_batch(tiny_model.cfg, b=2)

    def sample(seed):
        return tiny_model.generate(px, ids, mask, max_new_tokens=8, do_sample=True, top_k=50,
                                   generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


@pytest.mark.parametrize("kw", [{"top_k": 3}, {"top_p": 0.3}, {"top_k": 5, "top_p": 0.5, "temperature": 0.7}])
def test_sampled_tokens_respect_filters(tiny_model, make_batch, kw):
    """Every sampled token survives the filter applied to the teacher-forced logits of its step."""
    px, ids, mask = make_batch(tiny_model.cfg, b=3)
    out = tiny_model.generate(px, ids, mask, max_new_tokens=8, do_sample=True,
                              generator=torch.Generator().manual_seed(0), **kw)
    start = torch.zeros_like(out[:, :1])
    with torch.no_grad():
        logits = tiny_model(px, ids, mask, decoder_input_ids=torch.cat([start, out[:, :-1]], 1)).logits
    filt = filter_logits(logits.flatten(0, 1), kw.get("temperature", 1.0), kw.get("top_k", 0),
                         kw.get("top_p", 1.0)).view_as(logits)
    chosen = filt.gather(2, out[:, :, None])[:, :, 0]
    assert torch.isfinite(chosen).all()


def test_top_k_one_equals_greedy(tiny_model, make_batch):
    px, ids, mask = make_batch(tiny_model.cfg, b=2)
    greedy = tiny_model.generate(px, ids, mask, max_new_tokens=6)
    sampled = tiny_model.generate(px, ids, mask, max_new_tokens=6, do_sample=True, top_k=1,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


def test_filter_logits_semantics():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda f: torch.isfinite(f)[0].tolist()
    assert kept(filter_logits(logits, 1.0, 2, 1.0)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.75)) == [True, True, False, False]
    assert kept(filter_logits(logits, 1.0, 0, 0.9)) == [True, True, True, False]
    assert torch.allclose(filter_logits(logits, 2.0, 0, 1.0), logits / 2)


def test_text_only_generation(tiny_model, make_batch):
    _, ids, mask = make_batch(tiny_model.cfg, b=2, with_image=False)
    out = tiny_model.generate(None, ids, mask, max_new_tokens=4)
    assert out.shape == (2, 4) and out.dtype == torch.long


@pytest.mark.parametrize("kw, word", [({"max_new_tokens": 0}, "max_new_tokens"), ({"num_beams": 0}, "num_beams"),
                                      ({"do_sample": True, "temperature": 0.0}, "temperature"),
                                      ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                                      ({"do_sample": True, "num_beams": 2}, "beam")])
def test_bad_generate_arguments(tiny_model, make_batch, kw, word):
    px, ids, mask = make_batch(tiny_model.cfg, b=1)
    with pytest.raises(ValueError, match=word):
        tiny_model.generate(px, ids, mask, **kw)


def test_all_padding_prompt_columns_are_cut_before_encoding(eos_model, make_batch):
    """Prompts padded to a fixed length (as the data pipeline delivers them) decode exactly like the same
    prompts padded to their longest, and the encoder only sees the real columns."""
    px, ids, mask = make_batch(eos_model.cfg, b=4)
    want = eos_model.generate(px, ids, mask, max_new_tokens=8, num_beams=2)
    seen = []
    hook = eos_model.text.encoder.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    try:
        padded = eos_model.generate(px, torch.cat([ids, torch.zeros_like(ids)], 1),
                                    torch.cat([mask, torch.zeros_like(mask)], 1), max_new_tokens=8, num_beams=2)
    finally:
        hook.remove()
    assert torch.equal(padded, want)
    assert seen == [eos_model.cfg.vision.num_tokens + ids.shape[1]]


def test_finished_rows_leave_the_batch(eos_model, make_batch):
    """Once a row emits EOS the decoder runs only the unfinished rows, and every row's tokens equal what
    that example generates on its own (and its own teacher-forced argmax)."""
    px, ids, mask = make_batch(eos_model.cfg, b=4)
    rows_seen = []
    hook = eos_model.text.decoder.register_forward_hook(lambda mod, args, out: rows_seen.append(out.shape[0]))
    try:
        out = eos_model.generate(px, ids, mask, max_new_tokens=10)
    finally:
        hook.remove()
    eos = eos_model.cfg.text.eos_token_id
    stops = [int((row == eos).nonzero()[0]) + 1 if (row == eos).any() else None for row in out]
    assert any(s is not None for s in stops) and any(s is None for s in stops)
    # live rows at step t = rows that had not emitted EOS before step t
    assert rows_seen == [sum(1 for s in stops if s is None or s > t) for t in range(out.shape[1])]
    for i in range(4):
        alone = eos_model.generate(px[i:i + 1], ids[i:i + 1], mask[i:i + 1], max_new_tokens=10)
        assert torch.equal(alone[0], out[i, :alone.shape[1]]) and not out[i, alone.shape[1]:].any()
    start = torch.zeros_like(out[:, :1])
    with torch.no_grad():
        logits = eos_model(px, ids, mask, decoder_input_ids=torch.cat([start, out[:, :-1]], 1)).logits
    real = torch.ones_like(out, dtype=torch.bool)
    for i, s in enumerate(stops):
        if s is not None:
            real[i, s:] = False
    assert torch.equal(logits.argmax(-1)[real], out[real])


@pytest.mark.parametrize("length_penalty", [1.0, 0.6])
def test_beam_search_drops_examples_that_are_done(eos_model, make_batch, length_penalty):
    """An example whose finished hypotheses can no longer change leaves the batch with its beams; every
    example's result equals its beam search alone."""
    px, ids, mask = make_batch(eos_model.cfg, b=4)
    rows_seen = []
    hook = eos_model.text.decoder.register_forward_hook(lambda mod, args, out: rows_seen.append(out.shape[0]))
    try:
        out = eos_model.generate(px, ids, mask, max_new_tokens=10, num_beams=3, length_penalty=length_penalty)
    finally:
        hook.remove()
    assert rows_seen[0] == 12 and rows_seen[-1] < 12 and rows_seen == sorted(rows_seen, reverse=True)
    assert all(n % 3 == 0 for n in rows_seen)  # whole examples (3 beams each) leave
    for i in range(4):
        alone = eos_model.generate(px[i:i + 1], ids[i:i + 1], mask[i:i + 1], max_new_tokens=10, num_beams=3,
                                   length_penalty=length_penalty)
        assert torch.equal(alone[0], out[i, :alone.shape[1]]) and not out[i, alone.shape[1]:].any()
