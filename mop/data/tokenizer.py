"""Tokenizers: a dependency-free byte tokenizer and a wrapper around a local HF `tokenizer.json`.

Both expose the same small surface used by dataset preparation: `name`, `vocab_size`, `eos_id`,
`encode(text)`, `encode_batch(texts)` and `decode(ids)`. Encoding never adds special tokens;
dataset preparation appends `eos_id` after every document itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

# Tried in this order when no `eos_token` is given: GPT-2/Qwen/Llama-3 style, SentencePiece
# style, chat-template style, Gemma style, then Llama-3's explicit end-of-text.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes as tokens: bytes 0..255 are ids 0..255, then `eos_id = 256`, `pad_id = 257`."""

    name = "byte"
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text`, without special tokens."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for each text."""
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A local Hugging Face `tokenizer.json`, loaded with the `tokenizers` library.

    `eos_token` names the end-of-document token; when None, the first of `EOS_CANDIDATES`
    present in the vocabulary is used.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {str(path)!r} does not exist; pass 'byte' or the path of a "
                "Hugging Face tokenizer.json (or of a directory containing one)"
            )
        self.path = path
        self.name = str(path)
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_token, self.eos_id = self._find_eos(eos_token)
        self.pad_id = self.eos_id  # padding never reaches the loss (labels are masked)

    def _find_eos(self, eos_token: str | None) -> tuple[str, int]:
        candidates = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token, int(token_id)
        if eos_token is not None:
            raise ValueError(
                f"eos_token {eos_token!r} is not in the vocabulary of {self.name}; "
                "pass a token that the tokenizer knows"
            )
        raise ValueError(
            f"tokenizer {self.name} has none of the usual end-of-text tokens {list(EOS_CANDIDATES)}; "
            "pass eos_token= (CLI: --eos-token) naming the token that ends a document"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (the Rust tokenizer encodes the batch in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens kept."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def load_tokenizer(spec: str | Path, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """`"byte"` gives `ByteTokenizer`; anything else is the path of a `tokenizer.json` (or its dir)."""
    if str(spec) == "byte":
        if eos_token is not None:
            raise ValueError("eos_token applies to tokenizer.json files only; the byte tokenizer's eos is id 256")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)
