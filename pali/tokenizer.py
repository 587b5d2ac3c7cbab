"""SentencePiece tokenizer with mT5 conventions: pad 0, eos 1, unk 2, no bos, `<extra_id_N>` sentinels.

`Tokenizer.load` reads any `.model` file (mT5's `spiece.model` unchanged); `Tokenizer.train` builds a small
unigram model (byte fallback, sentinels as user-defined symbols) from an iterable of strings, which is how
the tiny preset gets its 2048-token vocabulary from the synthetic corpus.

Sentinels: a model trained here stores `<extra_id_0>` ... `<extra_id_{n-1}>` as pieces (ids 3 .. n+2).
A model without such pieces (mT5's `spiece.model`) gets 100 virtual sentinels appended after its pieces
in Hugging Face's order: `<extra_id_0>` is the highest id, `sentinel_id(n) = piece_size + 99 - n`.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
_SENTINEL_RE = re.compile(r"^<extra_id_(\d+)>$")
_VIRTUAL_SENTINELS = 100


class Tokenizer:
    """A SentencePiece model plus the sentinel and special-id conventions of mT5.

    Build one with `Tokenizer.load(path)`, `Tokenizer.train(texts, vocab_size)` or
    `Tokenizer.from_proto(bytes)`; it pickles as its serialized model proto (cheap to ship to Ray tasks).
    """

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(self._proto)
        self._pieces = self._sp.GetPieceSize()
        for name, want, got in (("pad", PAD_ID, self._sp.pad_id()), ("eos", EOS_ID, self._sp.eos_id()),
                                ("unk", UNK_ID, self._sp.unk_id())):
            # mT5's model keeps eos/unk/pad at 1/2/0 too; anything else would silently break the model.
            if got != want and not (name == "pad" and got == -1 and self._sp.IdToPiece(0) == "<pad>"):
                raise ValueError(f"sentencepiece model has {name}_id={got}; expected {want} (mT5 layout)")
        sentinels: dict[int, int] = {}
        for i in range(self._pieces):
            m = _SENTINEL_RE.match(self._sp.IdToPiece(i))
            if m:
                sentinels[int(m.group(1))] = i
        self._virtual = not sentinels
        if self._virtual:
            sentinels = {n: self._pieces + _VIRTUAL_SENTINELS - 1 - n for n in range(_VIRTUAL_SENTINELS)}
        self._sentinels = sentinels
        self._sentinel_piece = {i: f"<extra_id_{n}>" for n, i in sentinels.items()}

    # --- construction --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a serialized sentencepiece `.model` file (a local path or an object-storage URI)."""
        from pali import storage

        if not storage.exists(path):
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist; expected a sentencepiece .model")
        return cls(storage.read_bytes(path))

    @classmethod
    def from_proto(cls, model_proto: bytes) -> Tokenizer:
        """Build from serialized model proto bytes (what `model_proto` returns)."""
        return cls(model_proto)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, out_path: str | os.PathLike | None = None,
              num_sentinels: int = 100, max_sentences: int = 50_000, seed: int = 0) -> Tokenizer:
        """Train a unigram model with byte fallback on at most `max_sentences` non-empty strings.

        Special ids: pad 0, eos 1, unk 2, no bos; `<extra_id_0>` .. `<extra_id_{num_sentinels-1}>` are
        user-defined symbols (ids 3 ..). `vocab_size` is an upper bound: a small corpus may yield fewer
        pieces (every id is always < `vocab_size`). Writes the `.model` to `out_path` when given.
        """
        reserved = 3 + num_sentinels + 256  # specials + sentinels + byte-fallback pieces
        if vocab_size <= reserved:
            raise ValueError(f"vocab_size={vocab_size} too small; expected > {reserved} "
                             f"(3 specials + {num_sentinels} sentinels + 256 bytes)")
        sentences: list[str] = []
        for t in texts:
            t = str(t).replace("\n", " ").strip()
            if t:
                sentences.append(t)
                if len(sentences) >= max_sentences:
                    break
        if not sentences:
            raise ValueError("Tokenizer.train got no non-empty text; expected an iterable of strings")
        proto = io.BytesIO()
        spm.set_random_generator_seed(seed)  # sentence sampling/shuffling is seeded globally
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sentences),
            model_writer=proto,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",  # exact round trips (mT5 itself uses nmt_nfkc)
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            user_defined_symbols=[f"<extra_id_{i}>" for i in range(num_sentinels)],
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=4096,
            num_threads=max(1, min(4, os.cpu_count() or 1)),
            minloglevel=2,
        )
        tok = cls(proto.getvalue())
        if out_path is not None:
            tok.save(out_path)
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Write the serialized model proto (a `.model` file) atomically."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name + ".")
        with os.fdopen(fd, "wb") as f:
            f.write(self._proto)
        os.replace(tmp, p)

    def __reduce__(self):
        return (Tokenizer, (self._proto,))

    # --- properties ----------------------------------------------------------------------------------

    @property
    def model_proto(self) -> bytes:
        """Serialized sentencepiece model proto (the bytes of a `.model` file)."""
        return self._proto

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (pieces, plus 100 virtual sentinels for mT5-style models)."""
        return self._pieces + (_VIRTUAL_SENTINELS if self._virtual else 0)

    @property
    def pad_id(self) -> int:
        """Padding id (0); also the decoder start token."""
        return PAD_ID

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (1)."""
        return EOS_ID

    @property
    def unk_id(self) -> int:
        """Unknown-piece id (2)."""
        return UNK_ID

    @property
    def num_sentinels(self) -> int:
        """How many `<extra_id_N>` sentinels exist."""
        return len(self._sentinels)

    def sentinel_id(self, n: int) -> int:
        """Id of `<extra_id_{n}>`."""
        if n not in self._sentinels:
            raise ValueError(f"sentinel {n} out of range; expected 0 <= n < {len(self._sentinels)}")
        return self._sentinels[n]

    def __len__(self) -> int:
        return self.vocab_size

    # --- encode / decode -----------------------------------------------------------------------------

    def encode(self, text: str, add_eos: bool = True, max_len: int | None = None) -> list[int]:
        """Token ids of `text`, eos appended; with `max_len` truncated so the eos is kept as last id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._encode_text(text)
        return self._finish(ids, add_eos, max_len)

    def encode_batch(self, texts: Sequence[str], add_eos: bool = True,
                     max_len: int | None = None) -> list[list[int]]:
        """`encode` over a list of strings."""
        texts = [str(t) for t in texts]
        if self._virtual and any("<extra_id_" in t for t in texts):
            return [self.encode(t, add_eos, max_len) for t in texts]
        return [self._finish(ids, add_eos, max_len) for ids in self._sp.EncodeAsIds(texts)]

    def _encode_text(self, text: str) -> list[int]:
        if not self._virtual or "<extra_id_" not in text:
            return self._sp.EncodeAsIds(text)
        # Virtual sentinels are not pieces: split them out so they map to their reserved ids.
        ids: list[int] = []
        for part in re.split(r"(<extra_id_\d+>)", text):
            m = _SENTINEL_RE.match(part)
            if m and int(m.group(1)) in self._sentinels:
                ids.append(self._sentinels[int(m.group(1))])
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    @staticmethod
    def _finish(ids: list[int], add_eos: bool, max_len: int | None) -> list[int]:
        if max_len is not None:
            if max_len < 1:
                raise ValueError(f"max_len={max_len}; expected >= 1")
            ids = ids[: max_len - 1] if add_eos else ids[:max_len]
        return ids + [EOS_ID] if add_eos else list(ids)

    def decode(self, ids: Any) -> str:
        """Text of `ids` (list, 1-D numpy array or tensor): stops at the first eos, skips pad and unknown ids."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i == PAD_ID or i < 0:
                continue
            if i in self._sentinel_piece and self._virtual:
                if run:
                    out.append(self._decode_run(run, bool(out)))
                    run = []
                out.append(self._sentinel_piece[i])
            elif i < self._pieces:
                run.append(i)
            # ids past the vocabulary (an untrained model's output over a padded embedding) are dropped
        if run:
            out.append(self._decode_run(run, bool(out)))
        return "".join(out)

    def _decode_run(self, run: list[int], after_sentinel: bool) -> str:
        text = self._sp.DecodeIds(run)
        # sentencepiece drops the leading word-boundary space; after a virtual sentinel it is real text
        if after_sentinel and self._sp.IdToPiece(run[0]).startswith("\u2581"):
            text = " " + text
        return text

    def decode_batch(self, batch: Any) -> list[str]:
        """`decode` over a list of id lists or a 2-D array/tensor."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i` (sentinels included)."""
        if i in self._sentinel_piece:
            return self._sentinel_piece[i]
        if not 0 <= i < self._pieces:
            raise ValueError(f"id {i} out of range; expected 0 <= id < {self.vocab_size}")
        return self._sp.IdToPiece(i)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sentinels={self.num_sentinels})"
