"""A WordPiece tokenizer built from the enabled tasks' training texts, saved in the standard HF format.

``AutoTokenizer.from_pretrained(path)`` opens what :func:`train_tokenizer` writes; the special tokens and the
``[CLS] text [SEP]`` template follow BERT, so ViLT's text embeddings see the same layout as with bert-base-uncased.

The vocabulary is counted here, not by ``tokenizers``' ``WordPieceTrainer``: that trainer breaks ties between equally
frequent merges in hash-map order, which differs between processes, so two runs on the same texts gave different ids
(and every model downstream differed). :func:`wordpiece_vocab` is a pure function of the texts: BERT's normaliser and
pre-tokeniser split them into words, and the vocabulary holds the special tokens, every character (word-initial and
``##`` continuation, so any word over the alphabet can be spelt) and then whole words by frequency.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocab(texts: Iterable[str], vocab_size: int) -> dict[str, int]:
    """Token → id, deterministic in ``texts``: :data:`SPECIAL` (ids 0..4), the sorted alphabet, the same characters
    as ``##`` continuations, then the most frequent words (ties alphabetical) until ``vocab_size`` tokens.

    Words left out are spelt from the longest pieces in the vocabulary by WordPiece (at worst one character each).
    """
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({char for word in counts for char in word})
    tokens = [*SPECIAL, *alphabet, *(f"##{char}" for char in alphabet)]
    if vocab_size < len(tokens):
        raise ValueError(f"tokenizer.vocab_size={vocab_size}: must be at least {len(tokens)} (the special tokens and "
                         f"the {len(alphabet)} characters of the training texts, word-initial and ##continuation)")
    words = sorted((word for word in counts if len(word) > 1), key=lambda word: (-counts[word], word))
    tokens += words[:vocab_size - len(tokens)]
    return {token: i for i, token in enumerate(tokens)}


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer over :func:`wordpiece_vocab` of ``texts`` (special tokens get ids 0..4,
    [PAD] = 0); the same texts always give the same tokenizer."""
    core = Tokenizer(models.WordPiece(wordpiece_vocab(texts, vocab_size), unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    cls, sep = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, model_max_length=max_length, pad_token="[PAD]", unk_token="[UNK]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


def from_pretrained(source: str, max_length: int) -> PreTrainedTokenizerFast:
    """A pretrained tokenizer (hub id such as ``bert-base-uncased``, or a local directory), truncating at
    ``max_length`` (ViLT: 40)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.model_max_length = max_length
    return tokenizer


def save(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """``save_pretrained`` into a temporary directory that then replaces ``path`` whole (:func:`io.atomic_dir`)."""
    from vldistill.io import atomic_dir

    with atomic_dir(path) as tmp:
        tokenizer.save_pretrained(str(tmp))


def load(path: str | Path) -> PreTrainedTokenizerFast:
    """Open a saved tokenizer directory; a clear error when it is missing."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: tokenizer not found (run `dvc repro tokenizer`)")
    return AutoTokenizer.from_pretrained(str(path))
