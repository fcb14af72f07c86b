"""Tokenizers: a word-level captioning vocabulary and BERT-style WordPiece, all local files.

The word-level tokenizer normalises text as Karpathy's preprocessing does (lower-case, drop
ASCII punctuation, split on whitespace) and wraps ids as `[BOS] w1 .. wn [EOS]`. Both kinds are
`transformers.PreTrainedTokenizerFast` objects saved as `tokenizer.json` in a directory; nothing
is fetched from a hub.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers as tk_trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
CLS, SEP, MASK = "[CLS]", "[SEP]", "[MASK]"
WORD_SPECIALS = (PAD, BOS, EOS, UNK)
BERT_SPECIALS = (PAD, UNK, CLS, SEP, MASK)

_PUNCT_CLASS = "[" + re.escape(string.punctuation) + "]"
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def karpathy_tokenize(text: str) -> list[str]:
    """Karpathy's caption preprocessing: lower-case, delete punctuation, split on whitespace."""
    return text.lower().translate(_PUNCT_TABLE).split()


def _word_pipeline(vocab: dict[str, int]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(_PUNCT_CLASS), "")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return tokenizer


def _wrap_word(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def count_words(captions: Iterable[str | Sequence[str]]) -> Counter[str]:
    """Word counts over captions given as raw strings or as token lists."""
    counts: Counter[str] = Counter()
    for caption in captions:
        tokens = karpathy_tokenize(caption) if isinstance(caption, str) else caption
        counts.update(tokens)
    return counts


def build_word_vocab(
    captions: Iterable[str | Sequence[str]], *, min_count: int = 5
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over words seen at least `min_count` times (rarer ones map to UNK).

    Ids: PAD=0, BOS=1, EOS=2, UNK=3, then words by falling count, ties alphabetically, so the
    same captions always give the same ids.
    """
    counts = count_words(captions)
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {token: i for i, token in enumerate(WORD_SPECIALS)}
    for word in words:
        if word not in vocab:
            vocab[word] = len(vocab)
    return _wrap_word(_word_pipeline(vocab))


def _bert_pipeline(model: models.Model, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _wrap_bert(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    cls_id, sep_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    if cls_id is None or sep_id is None:
        raise ValueError(f"WordPiece vocabulary lacks {CLS} or {SEP}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def train_wordpiece(
    texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = True
) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece vocabulary locally with the `tokenizers` trainer."""
    tokenizer = _bert_pipeline(models.WordPiece(unk_token=UNK), lowercase)
    trainer = tk_trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BERT_SPECIALS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap_bert(tokenizer)


def load_bert_vocab(vocab_file: str | Path, *, lowercase: bool = True) -> PreTrainedTokenizerFast:
    """A BERT tokenizer from a local `vocab.txt` (e.g. bert-base-uncased's), without a hub."""
    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"vocabulary file {vocab_file} does not exist")
    model = models.WordPiece.from_file(str(vocab_file), unk_token=UNK)
    return _wrap_bert(_bert_pipeline(model, lowercase))


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save as `tokenizer.json` plus `tokenizer_config.json` in `directory`."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local path, never a hub.

    `path` may be a dataset directory (its `tokenizer/` is used), a tokenizer directory, a
    `tokenizer.json` file, or a BERT `vocab.txt`.
    """
    path = Path(path)
    if path.is_dir() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "vocab.txt").is_file():
            path = path / "vocab.txt"
    if path.suffix == ".txt" and path.is_file():
        return load_bert_vocab(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt at {path}")
    config_file = path.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    keys = ("pad_token", "bos_token", "eos_token", "unk_token", "cls_token", "sep_token")
    kwargs = {
        key: config[key] for key in keys + ("mask_token",) if isinstance(config.get(key), str)
    }
    if config.get("model_input_names"):
        kwargs["model_input_names"] = list(config["model_input_names"])
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **kwargs)
