"""A preallocated per-row decoder cache with a one-token step of static shapes (iteration-level batching).

`SlotCache` owns, for `rows` slots, every decoder block's self-attention keys/values float[rows, H, L, dk]
(L = most decoded tokens per row), its cross-attention keys/values float[rows, H, S, dk] (S = longest
encoder output) and the cross-attention padding bias. A request takes one free slot (`prefill` writes its
encoder output there), then advances one token per `step` next to whatever else runs, at its own position;
a finished request frees the slot and the next one overwrites it. Nothing is reallocated or concatenated
while decoding, so the memory of a replica's cache is fixed when it starts.

`step(tokens, bucket)` runs rows 0..bucket-1 (buckets are powers of two, allocation takes the lowest free
slot so live rows stay packed at the front). Every tensor it reads or writes has a shape fixed by `bucket`
and nothing in it branches on data: per-row positions are a tensor (`pos`), new keys/values are scattered
at `pos` with `index_put_`, future and foreign positions are masked through the bias, and idle rows compute
garbage that is never read. `capture(buckets)` therefore records it once per bucket as a CUDA graph; `step`
then replays the graph (static input and output buffers) instead of launching ~10 kernels per block from
Python. The replayed kernels are those the eager step runs: on CPU, and at buckets not captured, `step` runs
eagerly, and that is the path the CPU tests check.

Model code is used as it is (the blocks' own projections, norms and feed-forward); the math is
`pali.models.generate.DecodeState.step` with L keys per row instead of t + 1, the masked ones adding
exactly zero attention weight.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from pali.models.t5 import padding_bias


def bucket_for(n: int, rows: int) -> int:
    """Smallest power of two >= n, at most `rows` (the batch sizes a step is run, or captured, at)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, rows)


def all_buckets(rows: int) -> list[int]:
    """Every bucket `bucket_for` returns for a cache of `rows` slots, ascending (1, 2, 4, ..., rows)."""
    return sorted({bucket_for(n, rows) for n in range(1, rows + 1)})


class SlotCache:
    """Decoder state for `rows` concurrent requests of one model (see the module docstring).

    model: a `pali.models.pali.PaLI` in eval mode; max_len: most tokens decoded per row (L);
    max_src: longest encoder output (visual tokens + prompt) a row may attend to (S).
    """

    def __init__(self, model, rows: int, max_len: int, max_src: int):
        dec = model.text.decoder
        p = next(model.parameters())
        dev, dt = p.device, p.dtype
        cfg = model.cfg.text
        nb, h, dk = len(dec.blocks), cfg.num_heads, cfg.d_kv
        self.model, self.rows, self.max_len, self.max_src = model, rows, max_len, max_src
        self.k = torch.zeros(nb, rows, h, max_len, dk, device=dev, dtype=dt)  # self-attention keys
        self.v = torch.zeros_like(self.k)
        self.ck = torch.zeros(nb, rows, h, max_src, dk, device=dev, dtype=dt)  # cross-attention keys
        self.cv = torch.zeros_like(self.ck)
        self.cross_bias = torch.zeros(rows, 1, 1, max_src, device=dev, dtype=dt)  # padding -> finfo.min
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)  # next position of each row
        self.live = torch.zeros(rows, dtype=torch.long, device=dev)  # 1 = the row advances at each step
        # (H, L, L): relative position bias + causal mask of query position i over key positions 0..L-1
        self.bias_table = dec.self_bias(max_len, 0, max_len, dev, dt)[0]
        self.arange = torch.arange(rows, device=dev)
        # bucket -> (static tokens int[bucket], static logits float[bucket, V], torch.cuda.CUDAGraph)
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, object]] = {}
        self._pool = None  # the captured graphs' shared memory pool (one step runs at a time)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.ck, self.cv, self.cross_bias))

    @torch.inference_mode()
    def prefill(self, slots: list[int], enc: torch.Tensor, enc_mask: torch.Tensor) -> None:
        """Write encoder output float[n, S', D] / int[n, S'] (S' <= max_src) of n new requests into `slots`."""
        n, s = enc_mask.shape
        if s > self.max_src:
            raise ValueError(f"encoder output is {s} positions; the cache holds at most {self.max_src}")
        idx = torch.tensor(slots, dtype=torch.long, device=self.pos.device)
        for i, block in enumerate(self.model.text.decoder.blocks):
            k, v = block.cross_attn.project_kv(enc)  # (n, H, S', dk)
            self.ck[i, idx, :, :s] = k
            self.cv[i, idx, :, :s] = v
        bias = torch.full((n, 1, 1, self.max_src), torch.finfo(self.k.dtype).min, dtype=self.k.dtype,
                          device=self.k.device)
        bias[..., :s] = padding_bias(enc_mask, self.k.dtype)
        self.cross_bias[idx] = bias
        self.pos[idx] = 0
        self.live[idx] = 1

    def release(self, slot: int) -> None:
        """Stop advancing `slot` (its data stays until the next `prefill` overwrites it)."""
        self.live[slot] = 0
        self.pos[slot] = 0

    def reset(self) -> None:
        """Release every slot (a new batch starts: `generate_static` reuses one cache across calls)."""
        self.live.zero_()
        self.pos.zero_()

    @torch.inference_mode()
    def capture(self, buckets: Iterable[int]) -> None:
        """Record `step` at each bucket as a CUDA graph (the cache must be on a CUDA device).

        Warm-up steps run on a side stream first, as torch documents for graph capture; they write keys and
        values only at each row's next position, which that row's next real step overwrites before reading
        it, and `pos` is restored, so capture may happen while rows are decoding. The graphs share one
        memory pool (captured largest first), which is safe because steps never run concurrently; errors
        are checked on this thread only, so other models' decode threads may keep running meanwhile.
        """
        dev = self.k.device
        if dev.type != "cuda":
            raise ValueError(f"CUDA graphs need the cache on a CUDA device; it is on {dev}")
        todo = sorted(set(buckets) - set(self.graphs), reverse=True)
        bad = [b for b in todo if not 1 <= b <= self.rows]
        if bad:
            raise ValueError(f"buckets {bad} out of range; expected 1..{self.rows} (the cache's rows)")
        pos = self.pos.clone()
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        for b in todo:
            tokens = torch.zeros(b, dtype=torch.long, device=dev)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(tokens, b)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.pos.copy_(pos)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._step(tokens, b)
            self.graphs[b] = (tokens, logits, graph)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, bucket: int) -> torch.Tensor:
        """Feed int[bucket] newest tokens of rows 0..bucket-1; next-token logits float[bucket, V].

        Static shapes for a fixed `bucket`; the caller samples from the logits and never branches inside.
        At a captured bucket (`capture`) the logits are the graph's output buffer, which the next step at
        that bucket overwrites: read them before stepping again.
        """
        captured = self.graphs.get(bucket)
        if captured is None:
            return self._step(tokens, bucket)
        static_tokens, logits, graph = captured
        static_tokens.copy_(tokens)
        graph.replay()
        return logits

    def _step(self, tokens: torch.Tensor, bucket: int) -> torch.Tensor:
        """`step`'s kernels (what a graph captures)."""
        text = self.model.text
        b = bucket
        pos = self.pos[:b]
        rows = self.arange[:b]
        x = text.shared(tokens[:, None])  # (b, 1, D); ids come from argmax/sampling: always in range
        self_bias = self.bias_table.index_select(1, pos).permute(1, 0, 2).unsqueeze(2)  # (b, H, 1, L)
        cross_bias = self.cross_bias[:b]  # (b, 1, 1, S)
        for i, block in enumerate(text.decoder.blocks):
            att = block.self_attn
            hx = block.norm1(x)
            q, k, v = att._heads(att.q(hx)), att._heads(att.k(hx)), att._heads(att.v(hx))  # (b, H, 1, dk)
            self.k[i][rows, :, pos] = k[:, :, 0]
            self.v[i][rows, :, pos] = v[:, :, 0]
            out = F.scaled_dot_product_attention(q, self.k[i, :b], self.v[i, :b], attn_mask=self_bias, scale=1.0)
            x = x + att.o(out.reshape(b, 1, -1))
            ca = block.cross_attn
            q = ca._heads(ca.q(block.norm2(x)))
            out = F.scaled_dot_product_attention(q, self.ck[i, :b], self.cv[i, :b], attn_mask=cross_bias, scale=1.0)
            x = x + ca.o(out.reshape(b, 1, -1))
            x = x + block.mlp(block.norm3(x))
        h = text.decoder.final_norm(x)
        self.pos[:b] += self.live[:b]
        return text.logits(h[:, -1]).float()
