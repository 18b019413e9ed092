"""A WordPiece tokenizer trained on the enabled tasks' training texts, saved in the standard HF format.

``AutoTokenizer.from_pretrained(path)`` opens what :func:`train_tokenizer` writes; the special tokens and the
``[CLS] text [SEP]`` template follow BERT, so ViLT's text embeddings see the same layout as with bert-base-uncased.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Train a lower-casing WordPiece tokenizer on ``texts`` (special tokens get ids 0..4, [PAD] = 0)."""
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=1)
    core.train_from_iterator(texts, trainer=trainer)
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
    tokenizer.save_pretrained(str(path))


def load(path: str | Path) -> PreTrainedTokenizerFast:
    """Open a saved tokenizer directory; a clear error when it is missing."""
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: tokenizer not found (run `dvc repro tokenizer`)")
    return AutoTokenizer.from_pretrained(str(path))
