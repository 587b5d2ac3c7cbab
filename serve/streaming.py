"""Incremental detokenisation for streamed answers, safe for multi-byte text."""

from __future__ import annotations

import json
from typing import Any


class Detokenizer:
    """Turns a growing list of token ids into text pieces that never split a character.

    The whole prefix is decoded each time (SentencePiece drops or adds word-boundary spaces depending on
    the neighbours, and byte-fallback pieces form one character only together): a piece is released only
    when the decoded text extends what was sent and does not end in U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.sent = ""

    def push(self, ids: list[int]) -> str:
        """The new text after `ids` (possibly empty: held back until it is whole)."""
        text = self.tok.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def finish(self, text: str) -> str:
        """What of the final `text` was not sent yet."""
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return piece


def sse(data: dict, event: str | None = None) -> str:
    """One server-sent event carrying JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"
