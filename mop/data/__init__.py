"""Data pipeline: tokenizers, dataset preparation, the built-in stdlib-docs corpus, packed loaders."""

from .corpus import ensure_default_dataset, stdlib_documents
from .loader import IGNORE_INDEX, PackedLoader, SyntheticLoader, TokenDataset
from .prepare import iter_documents, prepare_dataset, prepare_main, write_dataset
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "HFTokenizer",
    "PackedLoader",
    "SyntheticLoader",
    "TokenDataset",
    "ensure_default_dataset",
    "iter_documents",
    "load_tokenizer",
    "prepare_dataset",
    "prepare_main",
    "stdlib_documents",
    "write_dataset",
]
