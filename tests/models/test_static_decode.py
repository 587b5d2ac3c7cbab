"""Static-shape decoding (`generate_static`, `SlotCache`): the same tokens as the growing-cache path for greedy
and seeded sampling, batches with padding, early and late EOS, a NaFlex tower; the kept caches; the graph
plumbing with a stand-in for the CUDA graph (capture itself needs a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from pali import create_model
from pali.config import get_preset
from pali.models import naflex
from pali.models.generate import generate, generate_static
from pali.models.slot_cache import SlotCache, all_buckets, bucket_for

EOS = 1


def _batch(cfg, b: int, seed: int = 0):
    """b prompts of different real lengths (9, 4, 6, 9, ...), right-padded, and their images."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.text.vocab_size, (b, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 4), (2, 6)):
        if row < b:
            mask[row, n:], ids[row, n:] = 0, cfg.text.pad_token_id
    px = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return px, ids, mask


@pytest.mark.parametrize("b", [1, 3, 5, 8])
def test_greedy_tokens_equal_the_growing_cache(eos_model, b):
    """Rows stop at different steps (or run to max_new_tokens, filling the cache's every position); batches
    of 3 and 5 leave idle rows in their 4- and 8-row buckets."""
    px, ids, mask = _batch(eos_model.cfg, b)
    ref = generate(eos_model, px, ids, mask, max_new_tokens=10, static=False)
    out = generate_static(eos_model, px, ids, mask, max_new_tokens=10)
    assert torch.equal(out, ref)
    assert torch.equal(generate(eos_model, px, ids, mask, max_new_tokens=10, static=True), ref)
    if b >= 5:  # the batch exercises early stops and full-length rows
        stopped = (ref == EOS).any(1)
        assert ref.shape[1] == 10 and 0 < int(stopped.sum()) < b
        assert len({int(r.tolist().index(EOS)) for r in ref[stopped]} | {10}) >= 2


def test_every_row_stopping_early_ends_the_loop(eos_model):
    px, ids, mask = _batch(eos_model.cfg, 5)
    with torch.no_grad():
        m = copy.deepcopy(eos_model)
        m.text.lm_head.weight[EOS] *= 40  # EOS wins everywhere soon
    ref = generate(m, px, ids, mask, max_new_tokens=10, static=False)
    assert ref.shape[1] < 10
    assert torch.equal(generate_static(m, px, ids, mask, max_new_tokens=10), ref)
    one = generate_static(m, px, ids, mask, max_new_tokens=1)  # one step: a cache of one position
    assert torch.equal(one, generate(m, px, ids, mask, max_new_tokens=1, static=False))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=2.0, top_k=20),
                                dict(temperature=1.5, top_p=0.8)])
def test_seeded_sampling_equals_the_growing_cache(eos_model, kw):
    """Same generator seed, same tokens: the static path draws for the unfinished rows only, in order, as
    the growing-cache path does after finished rows leave its batch (so rows that stop early are needed)."""
    px, ids, mask = _batch(eos_model.cfg, 6)
    early = 0
    for seed in range(4):
        args = dict(max_new_tokens=10, do_sample=True, **kw)
        ref = generate(eos_model, px, ids, mask, static=False, generator=torch.Generator().manual_seed(seed), **args)
        out = generate_static(eos_model, px, ids, mask, generator=torch.Generator().manual_seed(seed), **args)
        assert torch.equal(out, ref), seed
        early += int(((ref == EOS).any(1) & (ref[:, -1] != EOS)).sum())
    assert early > 0  # some row stopped while others went on


def test_naflex_tower_decodes_the_same():
    cfg = get_preset("tiny").with_overrides(vision__naflex=True, vision__layout="siglip2",
                                            vision__max_num_patches=18)
    model = create_model(cfg, seed=0).eval()
    p = cfg.vision.patch_size
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(3, 3 * p, 6 * p, generator=g), torch.randn(3, 4 * p, 2 * p, generator=g),
              torch.randn(3, 2 * p, 2 * p, generator=g)]
    packed = naflex.pack_images(images, p, 18)  # 18, 8 and 4 real patches
    ids = torch.randint(3, 2048, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 3:] = 0
    ref = generate(model, packed, ids, mask, max_new_tokens=8, static=False)
    assert torch.equal(generate_static(model, packed, ids, mask, max_new_tokens=8), ref)


def test_kept_caches_are_reused_and_follow_the_weights(tiny_model):
    m = copy.deepcopy(tiny_model)
    px, ids, mask = _batch(m.cfg, 3)
    first = generate_static(m, px, ids, mask, max_new_tokens=6)
    caches = m._static_caches
    assert len(caches) == 1
    cache = next(iter(caches.values()))
    assert (cache.rows, cache.max_len, cache.max_src) == (4, 6, 32)  # 3 rows -> 4; 16 + 9 positions -> 32
    other = _batch(m.cfg, 2, seed=1)  # another batch in between: 2 rows, another cache
    generate_static(m, *other, max_new_tokens=6)
    assert len(caches) == 2
    assert torch.equal(generate_static(m, px, ids, mask, max_new_tokens=6), first)
    assert next(reversed(caches.values())) is cache  # reused, nothing left over from the other batch
    assert len(copy.deepcopy(m).__dict__["_static_caches"]) == 0  # a copy starts without caches
    with torch.no_grad():  # in place: the same cache reads the new weights
        m.text.lm_head.weight.mul_(-1)
    flipped = generate_static(m, px, ids, mask, max_new_tokens=6)
    assert torch.equal(flipped, generate(m, px, ids, mask, max_new_tokens=6, static=False))
    assert not torch.equal(flipped, first) and len(caches) == 2
    m.bfloat16()  # new parameter tensors: a new cache of that dtype replaces the old one of that shape
    generate_static(m, px.bfloat16(), ids, mask, max_new_tokens=6)
    assert len(caches) == 2 and next(reversed(caches.values())).k.dtype == torch.bfloat16


class _StandInGraph:
    """What `torch.cuda.CUDAGraph` does for `SlotCache.step`, on CPU: replay recomputes the captured step
    from the static tokens into the static logits buffer (kernels launched eagerly instead of replayed)."""

    def __init__(self, cache: SlotCache, tokens: torch.Tensor, logits: torch.Tensor):
        self.cache, self.tokens, self.logits, self.replays = cache, tokens, logits, 0

    def replay(self) -> None:
        self.replays += 1
        self.logits.copy_(self.cache._step(self.tokens, self.tokens.shape[0]))


def test_graph_replay_plumbing_with_a_stand_in_graph(eos_model, monkeypatch):
    """`generate_static(cuda_graphs=True)` captures once per cache and then only replays; the loop reads
    the static logits buffer before the next replay overwrites it (tokens equal the eager path's)."""
    captures = []

    def capture(self, buckets):
        for b in buckets:
            captures.append(b)
            tokens = torch.zeros(b, dtype=torch.long)
            logits = torch.empty(b, self.model.cfg.text.vocab_size)
            self.graphs[b] = (tokens, logits, _StandInGraph(self, tokens, logits))

    monkeypatch.setattr(SlotCache, "capture", capture)
    m = copy.deepcopy(eos_model)
    px, ids, mask = _batch(m.cfg, 5)
    ref = generate(m, px, ids, mask, max_new_tokens=10, static=False)
    for _ in range(2):
        assert torch.equal(generate_static(m, px, ids, mask, max_new_tokens=10, cuda_graphs=True), ref)
    assert captures == [8]
    graph = next(iter(m._static_caches.values())).graphs[8][2]
    assert graph.replays == 2 * ref.shape[1]


def test_capture_needs_cuda_and_buckets(tiny_model):
    cache = SlotCache(tiny_model, rows=6, max_len=4, max_src=8)
    with pytest.raises(ValueError, match="CUDA graphs need the cache on a CUDA device"):
        cache.capture([1, 2])
    assert all_buckets(6) == [1, 2, 4, 6] and all_buckets(8) == [1, 2, 4, 8] and all_buckets(1) == [1]
    assert [bucket_for(n, 6) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


def test_static_option_rejects_beam_search_and_no_cache(tiny_model):
    px, ids, mask = _batch(tiny_model.cfg, 2)
    with pytest.raises(ValueError, match="num_beams=3"):
        generate(tiny_model, px, ids, mask, max_new_tokens=4, num_beams=3, static=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(tiny_model, px, ids, mask, max_new_tokens=4, use_cache=False, static=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_static(tiny_model, px, ids, mask, max_new_tokens=0)
    # beam search on the default (static=None) stays on the growing cache
    assert generate(tiny_model, px, ids, mask, max_new_tokens=4, num_beams=2).shape[0] == 2
