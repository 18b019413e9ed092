"""Data: generated scenes, the prepared on-disk format every stage reads, the tokenizer and torch datasets."""
