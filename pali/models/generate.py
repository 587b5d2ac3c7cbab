"""Batched decoding for PaLI: greedy, sampling (temperature / top-k / top-p) and beam search.

The encoder runs once; each decoder block's cross-attention keys/values are computed once; decoder
self-attention keeps a KV cache so every step feeds only the newest token. Beam search follows the
semantics of Hugging Face `generate` (top 2K continuations, finished hypotheses scored with
sum_logprobs / length**length_penalty, its default early-stop heuristic) so outputs match on imported
weights.

Greedy and sampled decoding also run on a static-shape path (`generate_static`, `generate(static=...)`):
the decoder state lives in a preallocated `SlotCache` and every step has the same shapes, so on CUDA one
step is captured as a CUDA graph and replayed (no per-kernel launches from Python). Its tokens equal the
growing-cache path's (tested on CPU, greedy and seeded sampling).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from pali.models.slot_cache import SlotCache
from pali.models.t5 import padding_bias, real_length

NEG = -1.0e9


class DecodeState:
    """Encoder output, its mask, per-block cross K/V and self-attention caches for K rows per example."""

    def __init__(self, model, enc: torch.Tensor, enc_mask: torch.Tensor, use_cache: bool = True,
                 max_len: int | None = None):
        self.model, self.enc, self.enc_mask, self.use_cache = model, enc, enc_mask, use_cache
        decoder = model.text.decoder
        blocks = decoder.blocks
        self.cross_kv = [b.cross_attn.project_kv(enc) for b in blocks] if use_cache else None
        self.caches = [{} for _ in blocks] if use_cache else None
        self.tokens: torch.Tensor | None = None  # int[R, t] decoder inputs so far (uncached path)
        # Position bias (causal) for every step and the cross-attention padding bias, computed once per
        # generation instead of once per step: step t reads row t of the (max_len, max_len) table.
        self.self_bias = self.cross_bias = None
        if use_cache and max_len is not None:
            self.self_bias = decoder.self_bias(max_len, 0, max_len, enc.device, enc.dtype)  # (1, H, L, L)
            self.cross_bias = padding_bias(enc_mask, enc.dtype)  # (R, 1, 1, S)

    def step(self, last: torch.Tensor, offset: int) -> torch.Tensor:
        """Feed the newest decoder input int[R] at position `offset`; return next-token logits float[R, V]."""
        text = self.model.text
        if self.use_cache and self.self_bias is not None:
            # Token ids come from argmax / top-k / the start token: always in range, so the embedding is
            # looked up directly, without `embed`'s range check (two reductions and a sync per step).
            h = text.decoder(text.shared(last[:, None]), None, self.enc_mask, self.caches, self.cross_kv,
                             offset=offset, self_attn_bias=self.self_bias[:, :, offset:offset + 1, :offset + 1],
                             cross_attn_bias=self.cross_bias)
        elif self.use_cache:
            h = text.decoder(text.embed(last[:, None]), None, self.enc_mask, self.caches, self.cross_kv,
                             offset=offset)
        else:  # recompute the whole prefix (reference path for tests)
            self.tokens = last[:, None] if self.tokens is None else torch.cat([self.tokens, last[:, None]], 1)
            h = text.decoder(text.embed(self.tokens), self.enc, self.enc_mask)
        return text.logits(h[:, -1]).float()

    def reorder(self, index: torch.Tensor) -> None:
        """Take each row's decoding history from row `index[i]` (beam search moves beams within an example):
        self-attention caches, or the token history of the uncached path."""
        if self.use_cache:
            for c in self.caches:
                c["k"], c["v"] = c["k"].index_select(0, index), c["v"].index_select(0, index)
        elif self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Continue with rows `index` only (finished sequences leave the batch): their history as `reorder`,
        plus the per-row encoder states, mask, cross-attention K/V and padding bias."""
        self.reorder(index)
        self.enc, self.enc_mask = self.enc.index_select(0, index), self.enc_mask.index_select(0, index)
        if self.cross_kv is not None:
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
        if self.cross_bias is not None:
            self.cross_bias = self.cross_bias.index_select(0, index)


def _check_args(max_new_tokens, num_beams, temperature, top_k, top_p, length_penalty, do_sample):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1; got {num_beams!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off); got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1]; got {top_p!r}")
    if do_sample and num_beams > 1:
        raise ValueError("beam search with sampling is not supported; use num_beams=1 with do_sample=True")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of float[R, V] logits (removed -> -inf)."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop_orig = torch.zeros_like(drop).scatter(1, order, drop)
        logits = logits.masked_fill(drop_orig, float("-inf"))
    return logits


def generate(model, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, num_beams: int = 1,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             length_penalty: float = 1.0, use_cache: bool = True, generator: torch.Generator | None = None,
             image_mask: torch.Tensor | None = None, static: bool | None = None) -> torch.Tensor:
    """Generated target ids int[B, T] (decoder start excluded), pad after EOS, T <= max_new_tokens.

    pixel_values: float[B, 3, H, W] or None (text only); input_ids / attention_mask: int[B, S].
    static: greedy / sampled decoding on the static-shape path (`generate_static`, a CUDA graph per step on
    CUDA); None (the default) takes it on CUDA when num_beams == 1 and use_cache, the growing cache on CPU
    (where the static path measures no faster, and finished rows cost it steps: docs/performance.md). Beam
    search always uses the growing cache.
    """
    _check_args(max_new_tokens, num_beams, temperature, top_k, top_p, length_penalty, do_sample)
    if static is None:
        static = num_beams == 1 and use_cache and _device(model).type == "cuda"
    elif static and (num_beams > 1 or not use_cache):
        raise ValueError(f"static=True decodes greedily or by sampling with a cache; got num_beams={num_beams}, "
                         f"use_cache={use_cache} (pass static=False)")
    if static:
        def decode(enc, enc_mask):
            return _static_decode(model, enc, enc_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                                  generator, None)
    elif num_beams == 1:
        def decode(enc, enc_mask):
            return _sample_or_greedy(model, enc, enc_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                                     use_cache, generator)
    else:
        def decode(enc, enc_mask):
            return _beam_search(model, enc, enc_mask, max_new_tokens, num_beams, length_penalty, use_cache)
    return _encode_and_decode(model, pixel_values, input_ids, attention_mask, image_mask, decode)


def generate_static(model, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, do_sample: bool = False,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    generator: torch.Generator | None = None, image_mask: torch.Tensor | None = None,
                    cuda_graphs: bool | None = None) -> torch.Tensor:
    """Greedy or sampled decoding with static shapes: what `generate` returns for the same arguments.

    The encoder output of the B rows goes into a `SlotCache` of R = next power of two >= B rows,
    max_new_tokens positions and the encoder length (visual tokens + prompt) rounded up to `SRC_MULTIPLE`,
    kept on the model and reused by later calls of the same shape. Every step is `SlotCache.step` at bucket
    R; finished rows keep stepping (their tokens are discarded) so shapes never change. The tokens equal the
    growing-cache path's: the extra key positions are masked to exactly zero weight, and sampling draws
    from the generator for the unfinished rows only, in order, as that path does.
    cuda_graphs: replay the step as a CUDA graph captured on the first call of a shape (`SlotCache.capture`);
    None = on a CUDA device. On CPU the same loop runs the step eagerly.
    """
    _check_args(max_new_tokens, 1, temperature, top_k, top_p, 1.0, do_sample)

    def decode(enc, enc_mask):
        return _static_decode(model, enc, enc_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                              generator, cuda_graphs)
    return _encode_and_decode(model, pixel_values, input_ids, attention_mask, image_mask, decode)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _encode_and_decode(model, pixel_values, input_ids, attention_mask, image_mask, decode) -> torch.Tensor:
    """Encode in eval mode and inference mode, then `decode(enc, enc_mask)`; the caller's mode is restored."""
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == input_ids.shape:
        # Prompts padded to a fixed length (the data pipeline's batches): the all-padding tail columns would
        # only add masked keys to the encoder and to every decoding step's cross-attention.
        s = real_length(attention_mask.ne(0))
        input_ids, attention_mask = input_ids[:, :s], attention_mask[:, :s]
    was_training = model.training
    model.eval()
    try:
        # inference_mode, not no_grad: no version counters or view tracking on the ~100 small ops of every
        # decoding step. The result is cloned outside it so callers get an ordinary tensor.
        with torch.inference_mode():
            enc, enc_mask = model.encode(pixel_values, input_ids, attention_mask, image_mask)
            out = decode(enc, enc_mask)
        return out.clone()
    finally:
        model.train(was_training)


SRC_MULTIPLE = 32
"""`generate_static` sizes a cache's encoder positions to a multiple of this, so batches whose prompts differ
by a few tokens reuse one cache (and its CUDA graph); masked positions add exactly zero attention weight."""

MAX_STATIC_CACHES = 4
"""Most cache shapes `generate_static` keeps per model (least recently used dropped first)."""


class _StaticCaches(OrderedDict):
    """A model's `SlotCache`s by shape, and the lock of the decode using them. Neither copied nor pickled
    with the model: a deep copy gets an empty one (CUDA graphs cannot be copied; the copy's weights differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo) -> _StaticCaches:
        return _StaticCaches()

    def __reduce__(self):
        return _StaticCaches, ()

    def take(self, model, rows: int, max_len: int, max_src: int) -> SlotCache:
        """The cache of this shape, built on first use (the caller holds `lock`).

        Keyed by shape, device, dtype and the weights' storage addresses: a captured CUDA graph reads the
        weights where they were at capture, so moving or re-creating the parameters (`.to`,
        `load_state_dict(assign=True)`) makes a new cache, while an in-place `load_state_dict` keeps it.
        """
        params = list(model.parameters())
        key = (rows, max_len, max_src, params[0].device, params[0].dtype, tuple(p.data_ptr() for p in params))
        cache = self.get(key)
        if cache is None:
            for k in [k for k in self if k[:3] == key[:3]]:  # same shape, old weights: invalid graphs
                del self[k]
            while len(self) >= MAX_STATIC_CACHES:
                self.popitem(last=False)
            cache = self[key] = SlotCache(model, rows, max_len, max_src)
        self.move_to_end(key)
        return cache


@contextlib.contextmanager
def _slot_cache(model, rows: int, max_len: int, max_src: int) -> Iterator[tuple[SlotCache, bool]]:
    """(cache, kept): the model's kept `SlotCache` of this shape while this decode holds it, or a private
    one (not kept, never captured) when another thread is decoding with the model's caches (`serve` may
    run two batches at once)."""
    caches = model.__dict__.get("_static_caches")
    if caches is None:
        caches = model._static_caches = _StaticCaches()
    if not caches.lock.acquire(blocking=False):
        yield SlotCache(model, rows, max_len, max_src), False
        return
    try:
        yield caches.take(model, rows, max_len, max_src), True
    finally:
        caches.lock.release()


def _static_decode(model, enc, enc_mask, max_new_tokens, do_sample, temperature, top_k, top_p, generator,
                   cuda_graphs) -> torch.Tensor:
    """`generate_static` over an encoded batch: enc float[B, S, D], enc_mask int[B, S]."""
    (b, s), dev = enc_mask.shape, enc.device
    rows = 1 << (b - 1).bit_length()  # the bucket: a power of two, so batch sizes share graphs
    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda"
    with _slot_cache(model, rows, max_new_tokens, -(-s // SRC_MULTIPLE) * SRC_MULTIPLE) as (cache, kept):
        cache.reset()
        cache.prefill(list(range(b)), enc, enc_mask)
        if cuda_graphs and kept and rows not in cache.graphs:
            cache.capture([rows])
        return _static_loop(cache, b, max_new_tokens, do_sample, temperature, top_k, top_p, generator)


def _static_loop(cache: SlotCache, b: int, max_new_tokens, do_sample, temperature, top_k, top_p,
                 generator) -> torch.Tensor:
    """Decode rows 0..b-1 of a prefilled `cache` with steps at bucket `cache.rows`."""
    cfg = cache.model.cfg.text
    dev, rows = cache.pos.device, cache.rows
    tokens = torch.full((rows,), cfg.decoder_start_token_id, dtype=torch.long, device=dev)
    out = torch.full((b, max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    steps = 0
    for t in range(max_new_tokens):
        logits = cache.step(tokens, rows)[:b]  # (B, V); rows B..R-1 are idle
        if do_sample:
            # The generator draws for the unfinished rows only, in order: the same draws as `_sample_or_greedy`,
            # whose batch loses its finished rows.
            live = (~done).nonzero().squeeze(1)
            probs = filter_logits(logits.index_select(0, live), temperature, top_k, top_p).softmax(-1)
            nxt = torch.full((b,), cfg.pad_token_id, dtype=torch.long, device=dev)
            nxt.index_copy_(0, live, torch.multinomial(probs, 1, generator=generator).squeeze(1))
        else:
            nxt = logits.argmax(-1).masked_fill_(done, cfg.pad_token_id)
        out[:, t] = nxt
        steps = t + 1
        done |= nxt == cfg.eos_token_id
        if bool(done.all()):
            break
        tokens[:b] = nxt
    return out[:, :steps]


def _sample_or_greedy(model, enc, enc_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                      use_cache, generator) -> torch.Tensor:
    """Greedy or sampled decoding. A row that emits EOS leaves the batch (`DecodeState.keep_rows`): later
    steps run only the unfinished rows, so a batch of short and long answers costs what its live rows
    need (HF `generate` keeps computing finished rows and pads their output)."""
    cfg = model.cfg.text
    b, dev = enc.shape[0], enc.device
    state = DecodeState(model, enc, enc_mask, use_cache, max_len=max_new_tokens)
    last = torch.full((b,), cfg.decoder_start_token_id, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)  # output row of each live row
    out = torch.full((b, max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
    steps = 0
    for t in range(max_new_tokens):
        logits = state.step(last, t)  # (live rows, V)
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        out[:, t].index_copy_(0, rows, nxt)
        steps = t + 1
        live = nxt != cfg.eos_token_id
        if not bool(live.all()):
            keep = live.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            state.keep_rows(keep)
            rows, nxt = rows.index_select(0, keep), nxt.index_select(0, keep)
        last = nxt
    return out[:, :steps]


def _beam_search(model, enc, enc_mask, max_new_tokens, k, length_penalty, use_cache) -> torch.Tensor:
    """Beam search; an example whose best finished hypotheses can no longer change (HF's stopping
    heuristic) leaves the batch with its k beams, so later steps run only the examples still searching."""
    cfg = model.cfg.text
    b, dev = enc.shape[0], enc.device
    max_len = max_new_tokens + 1  # the start token counts, as in HF's max_length
    # Every example's encoder output repeated k times: rows are (example, beam).
    enc = enc.repeat_interleave(k, 0)
    enc_mask = enc_mask.repeat_interleave(k, 0)
    state = DecodeState(model, enc, enc_mask, use_cache, max_len=max_len)
    seqs = torch.full((b, k, max_len), cfg.pad_token_id, dtype=torch.long, device=dev)
    seqs[:, :, 0] = cfg.decoder_start_token_id
    run_scores = torch.zeros(b, k, device=dev)
    run_scores[:, 1:] = NEG  # all beams start identical: only the first may expand at step 0
    fin_seqs = seqs.clone()
    fin_scores = torch.full((b, k), NEG, device=dev)
    fin_lens = torch.zeros(b, k, dtype=torch.long, device=dev)
    fin_done = torch.zeros(b, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    examples = torch.arange(b, device=dev)  # output row of each example still searching
    final_seqs, final_lens = fin_seqs[:, 0].clone(), fin_lens[:, 0].clone()  # (B, L), (B,)
    keep = 2 * k
    top_k_mask = torch.arange(keep, device=dev) < k
    cur = 1
    while True:
        logits = state.step(seqs[:, :, cur - 1].reshape(-1), cur - 1)  # (B*k, V)
        v = logits.shape[-1]
        logp = F.log_softmax(logits, -1).view(b, k, v) + run_scores[:, :, None]
        cand_scores, cand = torch.topk(logp.view(b, k * v), keep)  # (B, 2k)
        src_beam, token = cand // v, cand % v
        cand_seqs = torch.gather(seqs, 1, src_beam[:, :, None].expand(-1, -1, max_len)).clone()
        cand_seqs[:, :, cur] = token
        hits = (token == cfg.eos_token_id) | (cur + 1 >= max_len)
        # Running beams for the next step: the best k candidates that did not stop.
        nxt = torch.topk(cand_scores + hits.float() * NEG, k).indices
        run_scores = torch.gather(cand_scores + hits.float() * NEG, 1, nxt)
        seqs = torch.gather(cand_seqs, 1, nxt[:, :, None].expand(-1, -1, max_len))
        parent = torch.gather(src_beam, 1, nxt)  # (B, k)
        # Finished hypotheses: only stops among the top k candidates count, scored with the length penalty.
        just = hits & top_k_mask[None, :]
        scored = cand_scores / (cur ** length_penalty)
        scored = scored + (~improvable).float() * NEG + (~just).float() * NEG
        m_scores = torch.cat([fin_scores, scored], 1)
        m_seqs = torch.cat([fin_seqs, cand_seqs], 1)
        m_lens = torch.cat([fin_lens, torch.full_like(cand, cur)], 1)
        m_done = torch.cat([fin_done, just], 1)
        best = torch.topk(m_scores, k).indices
        fin_scores = torch.gather(m_scores, 1, best)
        fin_seqs = torch.gather(m_seqs, 1, best[:, :, None].expand(-1, -1, max_len))
        fin_lens = torch.gather(m_lens, 1, best)
        fin_done = torch.gather(m_done, 1, best)
        state.reorder((parent + torch.arange(b, device=dev)[:, None] * k).view(-1))
        cur += 1
        # HF's default (early_stopping=False) heuristic: stop when the best running beam, scored at the
        # current length, cannot beat the worst finished hypothesis.
        best_running = run_scores[:, :1] / ((cur - 1) ** length_penalty)
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, NEG))
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        alive = improvable.squeeze(1)
        if not bool(alive.all()):  # finished examples leave the batch: their best hypothesis is final
            gone, kept = (~alive).nonzero().squeeze(1), alive.nonzero().squeeze(1)
            final_seqs.index_copy_(0, examples.index_select(0, gone), fin_seqs[gone, 0])
            final_lens.index_copy_(0, examples.index_select(0, gone), fin_lens[gone, 0])
            examples, b = examples.index_select(0, kept), kept.numel()
            seqs, run_scores, fin_seqs, fin_scores, fin_lens, fin_done, improvable = (
                t.index_select(0, kept) for t in (seqs, run_scores, fin_seqs, fin_scores, fin_lens, fin_done,
                                                   improvable))
            state.keep_rows((kept[:, None] * k + torch.arange(k, device=dev)).view(-1))
    final_seqs.index_copy_(0, examples, fin_seqs[:, 0])
    final_lens.index_copy_(0, examples, fin_lens[:, 0])
    out_len = int(final_lens.max())
    return final_seqs[:, 1:out_len + 1]
