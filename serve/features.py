"""Image-feature cache: the same image bytes reuse the vision tower's (projected) output."""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable

import torch


class FeatureCache:
    """LRU of tensors bounded in bytes (thread-safe: every model's decode loop shares one per replica).

    Keys are (model name, sha256 of the encoded image); values are visual tokens float[P, D].
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[Hashable, torch.Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> torch.Tensor | None:
        """The cached tensor (now most recently used) or None; counts a hit or a miss."""
        with self._lock:
            t = self._items.get(key)
            if t is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return t

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        """Insert, evicting least recently used entries past `max_bytes` (a value larger than that is not kept)."""
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, gone = self._items.popitem(last=False)
                self.bytes -= gone.numel() * gone.element_size()

    def as_dict(self) -> dict:
        """JSON form for `/v1/stats`."""
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses}
