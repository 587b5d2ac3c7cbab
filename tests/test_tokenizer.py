"""Tokenizer: training, special ids, sentinels, encode/decode, save/load."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from pali.data.prompts import prompt_templates
from pali.data.synthetic import make_texts
from pali.tokenizer import Tokenizer


def _corpus(n: int = 400) -> list[str]:
    texts = prompt_templates()
    for i in range(n):
        ex = make_texts(i, seed=3)
        texts += [ex["text"], ex["question"], ex["answer"]] + ([ex["ocr_text"]] if ex["ocr_text"] else [])
    return texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(_corpus(), vocab_size=2048)


def test_train_tiny_vocab_fast_and_in_range():
    texts = _corpus(1500)
    t0 = time.time()
    tok = Tokenizer.train(texts * 10, vocab_size=2048)  # many sentences: the 50k cap applies
    assert time.time() - t0 < 15
    assert 359 < tok.vocab_size <= 2048
    ids = [i for ids in tok.encode_batch(texts) for i in ids]
    assert max(ids) < 2048 and min(ids) >= 0
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown


def test_special_ids_and_sentinels(tok):
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.id_to_piece(1) == "</s>" and tok.id_to_piece(0) == "<pad>"
    assert tok.num_sentinels == 100
    sid = [tok.sentinel_id(n) for n in range(100)]
    assert len(set(sid)) == 100 and all(3 <= s < tok.vocab_size for s in sid)
    assert tok.encode("<extra_id_7>", add_eos=False) == [tok.sentinel_id(7)] or \
        tok.sentinel_id(7) in tok.encode("<extra_id_7>", add_eos=False)
    with pytest.raises(ValueError, match="sentinel 100"):
        tok.sentinel_id(100)


@pytest.mark.parametrize("text", ["two red circles and a blue star", "трое синих ромбов", "دائرتان حمراوان",
                                  "एक पीला तारा", "一个红色的圆形", "赤い図形はどれですか？", "빨간 원 한 개",
                                  "emoji 🙂 and ไทย unseen"])
def test_round_trip_multilingual(tok, text):
    ids = tok.encode(text)
    assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
    assert tok.decode(ids) == text


def test_decode_stops_at_eos_skips_pad_accepts_arrays(tok):
    a, b = tok.encode("a red circle", add_eos=False), tok.encode("un carré bleu")
    ids = [0] + a + [0, 1] + b
    assert tok.decode(ids) == "a red circle"
    assert tok.decode(torch.tensor(ids)) == "a red circle"
    assert tok.decode(np.array(ids)) == "a red circle"
    assert tok.decode([5000, 3000] + a) == "a red circle"  # ids past the vocabulary are dropped
    assert tok.decode_batch(torch.tensor([a + [1], a + [0]])) == ["a red circle"] * 2


def test_max_len_keeps_eos(tok):
    ids = tok.encode("three yellow hearts and a green diamond", max_len=4)
    assert len(ids) == 4 and ids[-1] == tok.eos_id
    assert len(tok.encode("three yellow hearts", add_eos=False, max_len=2)) == 2
    with pytest.raises(ValueError, match="max_len=0"):
        tok.encode("x", max_len=0)


def test_save_load_pickle(tok, tmp_path):
    path = tmp_path / "sub" / "tok.model"
    tok.save(path)
    assert path.read_bytes() == tok.model_proto
    back = Tokenizer.load(path)
    texts = ["une étoile verte", "какая фигура красная?"]
    assert back.encode_batch(texts) == tok.encode_batch(texts)
    assert pickle.loads(pickle.dumps(tok)).encode(texts[0]) == tok.encode(texts[0])
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")


def test_mt5_style_model_has_virtual_sentinels():
    # mT5's spiece.model has no <extra_id_N> pieces: Hugging Face appends 100 after the pieces, reversed.
    tok = Tokenizer.train(_corpus(200), vocab_size=800, num_sentinels=0)
    pieces = tok.vocab_size - 100
    assert tok.sentinel_id(0) == pieces + 99 and tok.sentinel_id(99) == pieces
    ids = tok.encode("a <extra_id_0> circle <extra_id_1>", add_eos=False)
    assert tok.sentinel_id(0) in ids and tok.sentinel_id(1) in ids
    assert tok.decode(ids) == "a<extra_id_0> circle<extra_id_1>"


def test_train_rejects_bad_input():
    with pytest.raises(ValueError, match="vocab_size=300"):
        Tokenizer.train(["a b c"], vocab_size=300)
    with pytest.raises(ValueError, match="no non-empty text"):
        Tokenizer.train(["", "  "], vocab_size=1000)
