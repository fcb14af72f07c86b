"""Tokenizers: word-level vocabulary, WordPiece, local vocab.txt, real Flickr8k captions."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmodaler_accel.data import (
    build_word_vocab,
    karpathy_tokenize,
    load_bert_vocab,
    load_tokenizer,
    read_pairs,
    save_tokenizer,
    train_wordpiece,
)

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


def test_karpathy_tokenize_lowercases_and_drops_punctuation():
    assert karpathy_tokenize("A man's T-shirt, (red)!  ") == ["a", "mans", "tshirt", "red"]
    assert karpathy_tokenize(" ... ") == []


def test_word_vocab_orders_by_count_and_applies_min_count():
    tokenizer = build_word_vocab(["a dog runs", "A dog sits.", "a cat", ["a", "dog"]], min_count=2)
    assert tokenizer.get_vocab() == {
        "[PAD]": 0,
        "[BOS]": 1,
        "[EOS]": 2,
        "[UNK]": 3,
        "a": 4,
        "dog": 5,
    }
    assert tokenizer("A dog, sits!")["input_ids"] == [1, 4, 5, 3, 2]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_word_vocab_save_load_round_trip(tmp_path):
    tokenizer = build_word_vocab(["a red circle left of a blue square"] * 3, min_count=1)
    save_tokenizer(tokenizer, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = load_tokenizer(path)
        text = "A red circle, left of a BLUE square."
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.get_vocab() == tokenizer.get_vocab()
        ids = loaded(text)["input_ids"]
        assert loaded.decode(ids, skip_special_tokens=True) == "a red circle left of a blue square"
        assert loaded.pad_token_id == 0 and loaded.unk_token_id == 3


def test_wordpiece_trains_locally_and_round_trips(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog"] * 20 + ["foxes jump quickly"] * 5
    tokenizer = train_wordpiece(texts, vocab_size=120, min_frequency=1)
    encoded = tokenizer("The fox jumps.", "a dog")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2
    assert encoded["token_type_ids"][-1] == 1
    save_tokenizer(tokenizer, tmp_path / "wp")
    loaded = load_tokenizer(tmp_path / "wp")
    assert loaded("The fox jumps.", "a dog")["input_ids"] == encoded["input_ids"]
    assert loaded.mask_token_id == tokenizer.mask_token_id == 4


def test_bert_vocab_txt_loads_from_a_local_path(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "large", "red", "circ", "##le"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = load_bert_vocab(tmp_path / "vocab.txt")
    ids = tokenizer("A LARGE red circle")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]",
        "a",
        "large",
        "red",
        "circ",
        "##le",
        "[SEP]",
    ]
    assert load_tokenizer(tmp_path)("red")["input_ids"] == [2, 7, 3]
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="shared Flickr8k captions not present")
def test_flickr8k_captions_tokenise_and_build_a_vocabulary():
    rows = read_pairs(FLICKR8K / "Flickr8k.token.txt")
    assert len(rows) == 40460
    train_images = set((FLICKR8K / "Flickr_8k.trainImages.txt").read_text().split())
    assert len(train_images) == 6000
    train = [caption for _, image, caption in rows if image.split("#")[0] in train_images]
    assert len(train) == 30000
    tokenizer = build_word_vocab(train, min_count=5)
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 4 + 2537  # specials + train words seen at least 5 times
    assert tokenizer.convert_ids_to_tokens(list(range(4, 14))) == [
        "a",
        "in",
        "the",
        "on",
        "is",
        "and",
        "dog",
        "with",
        "man",
        "of",
    ]
    assert {"climbing", "playhouse", "skateboarder"} <= set(vocab)
    encoded = tokenizer(train)["input_ids"]
    for caption, ids in zip(train, encoded):  # the fast tokenizer agrees with Karpathy's rules
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert ids[1:-1] == [
            vocab.get(w, tokenizer.unk_token_id) for w in karpathy_tokenize(caption)
        ]
    words = [i for ids in encoded for i in ids[1:-1]]
    assert (len(words), words.count(tokenizer.unk_token_id)) == (323639, 8390)
