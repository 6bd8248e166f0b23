"""Tokenize text into a packed-token dataset directory.

Layout of a prepared dataset (format version 1):

    shard_00000.bin  raw little-endian uint32 token ids (`np.memmap(path, dtype="<u4")`)
    shard_00001.bin  ... each at most `shard_tokens` tokens; a document may span two shards
    docs.npy         int64 [num_docs + 1]: start offset of every document in the concatenated
                     token stream, then the total (so doc i is tokens[docs[i]:docs[i+1]])
    meta.json        tokenizer spec, vocab_size, eos_id, num_tokens, num_docs, shards, format

Every document is its tokens followed by `eos_id`. The directory is written under a temporary
name next to `out_dir` and renamed into place, so a reader never sees a half-written dataset.

CLI (called by `mop data prepare`):

    mop data prepare corpus/ extra.jsonl --out data/mycorpus --tokenizer path/to/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .tokenizer import ByteTokenizer, load_tokenizer

FORMAT_NAME = "mop-tokens"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")
INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")
_ENCODE_BATCH_DOCS = 1024
_ENCODE_BATCH_CHARS = 16 * 2**20


def _resolve_inputs(inputs: Sequence[Path | str]) -> list[Path]:
    """Input files in order: explicit files as given, directories recursed in sorted order."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if len(inputs) == 0:
        raise ValueError("inputs is empty; pass at least one .txt, .jsonl or .parquet file or a directory")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input {str(path)!r} does not exist")
        if path.is_dir():
            # Inside directories, files of other kinds (README, licences, hidden files) are skipped.
            found = [
                p for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in INPUT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            files.extend(found)
        elif path.suffix in INPUT_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(
                f"input {str(path)!r} has unknown extension {path.suffix!r}; "
                f"valid extensions are {', '.join(INPUT_SUFFIXES)} (or pass a directory)"
            )
    return files


def _read_jsonl(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with key {text_key!r} "
                    "(choose the key with text_key / --text-key)"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: {text_key!r} must be a string, got {type(text).__name__}")
            yield text


def _read_parquet(path: Path, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            f"reading {path} needs pyarrow; install it (pip install pyarrow) or convert the data to .jsonl"
        ) from None
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_key not in columns:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {columns}); choose one with text_key / --text-key")
    for batch in parquet.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def iter_documents(
    inputs: Sequence[Path | str], text_key: str = "text", split_lines: bool = False
) -> Iterator[str]:
    """Documents of the inputs, in order; empty documents are dropped.

    A `.txt` file is one document, or one document per non-empty line with `split_lines`;
    `.jsonl` has one JSON object per line with the text under `text_key`; `.parquet` has the text
    in column `text_key`.
    """
    for path in _resolve_inputs(inputs):
        try:
            if path.suffix == ".txt":
                text = path.read_text(encoding="utf-8")
                texts: Iterable[str] = (ln for ln in text.splitlines() if ln.strip()) if split_lines else [text]
            elif path.suffix == ".jsonl":
                texts = _read_jsonl(path, text_key)
            else:
                texts = _read_parquet(path, text_key)
            for text in texts:
                if text:
                    yield text
        except UnicodeDecodeError as e:  # a ValueError too, but one that never says which file
            raise ValueError(f"{path}: not UTF-8 text ({e.reason}); convert it "
                             "(e.g. iconv -f latin1 -t utf-8) or leave it out of the inputs") from None


class _ShardWriter:
    """Appends uint32 tokens to `shard_%05d.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, shard_tokens: int):
        self.out_dir = out_dir
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._file is None or self.shards[-1]["num_tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["num_tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            self._file.write(piece.astype(TOKEN_DTYPE, copy=False).tobytes())
            self.shards[-1]["num_tokens"] += int(piece.size)

    def _open_next(self) -> None:
        self.close()
        name = f"shard_{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "num_tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _token_arrays(tokenizer, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):  # fast path: no per-byte Python ints
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]


def _batched(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _ENCODE_BATCH_DOCS or chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _is_dataset_dir(path: Path) -> bool:
    return (path / "meta.json").is_file()


def write_dataset(
    documents: Iterable[str],
    out_dir: Path | str,
    tokenizer_spec: str = "byte",
    shard_tokens: int = 2**26,
    eos_token: str | None = None,
    source: dict | None = None,
    replace: bool = True,
) -> Path:
    """Tokenize `documents` (each followed by eos) into a dataset at `out_dir`; returns `out_dir`.

    An existing dataset (or empty directory) at `out_dir` is replaced when `replace`; with
    `replace=False` a dataset that appeared there meanwhile (another process) is kept and ours
    dropped. `source` is stored in meta.json to describe where the text came from.
    """
    out_dir = Path(out_dir)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive number of tokens, got {shard_tokens}")
    if out_dir.exists() and not (out_dir.is_dir() and (_is_dataset_dir(out_dir) or not any(out_dir.iterdir()))):
        raise ValueError(
            f"out_dir {str(out_dir)!r} exists and is not a prepared dataset; "
            "choose a new directory (an existing dataset there would be replaced)"
        )
    tokenizer = load_tokenizer(tokenizer_spec, eos_token=eos_token)
    if tokenizer.vocab_size > 2**32:
        raise ValueError(
            f"tokenizer vocab_size {tokenizer.vocab_size} does not fit the uint32 token format (max 2**32)"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        writer = _ShardWriter(tmp_dir, shard_tokens)
        doc_offsets = [0]
        eos = np.array([tokenizer.eos_id], dtype=np.int64)
        for batch in _batched(documents):
            arrays = _token_arrays(tokenizer, batch)
            pieces = []
            for ids in arrays:
                pieces += [ids.astype(np.int64, copy=False), eos]
                doc_offsets.append(doc_offsets[-1] + ids.size + 1)
            writer.write(np.concatenate(pieces))
        writer.close()
        num_docs = len(doc_offsets) - 1
        if num_docs == 0:
            raise ValueError("the inputs hold no non-empty documents; nothing to prepare")
        np.save(tmp_dir / "docs.npy", np.asarray(doc_offsets, dtype=np.int64))
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tokenizer": str(tokenizer_spec),
            "eos_token": getattr(tokenizer, "eos_token", None),
            "vocab_size": int(tokenizer.vocab_size),
            "eos_id": int(tokenizer.eos_id),
            "dtype": "uint32",
            "num_tokens": int(doc_offsets[-1]),
            "num_docs": num_docs,
            "shards": writer.shards,
            "source": source or {},
        }
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _move_into_place(tmp_dir, out_dir, replace)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _move_into_place(tmp_dir: Path, out_dir: Path, replace: bool) -> None:
    if out_dir.exists():
        if not replace:
            return  # someone else finished first; the caller validates what is there
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        # Renaming onto a non-empty directory fails: another process got there first.
        if replace or not _is_dataset_dir(out_dir):
            raise


def prepare_dataset(
    inputs: Sequence[Path | str],
    out_dir: Path | str,
    tokenizer_spec: str = "byte",
    text_key: str = "text",
    shard_tokens: int = 2**26,
    split_lines: bool = False,
    eos_token: str | None = None,
) -> Path:
    """Tokenize `.txt` / `.jsonl` / `.parquet` files and directories into a dataset at `out_dir`."""
    files = _resolve_inputs(inputs)  # fail on bad inputs before loading the tokenizer
    if not files:
        raise ValueError(f"no .txt, .jsonl or .parquet files found in {[str(p) for p in inputs]}")
    source = {"inputs": [str(p) for p in inputs], "text_key": text_key, "split_lines": split_lines}
    docs = iter_documents(files, text_key=text_key, split_lines=split_lines)
    return write_dataset(docs, out_dir, tokenizer_spec, shard_tokens, eos_token=eos_token, source=source)


def prepare_main(argv: list[str] | None = None) -> int:
    """`mop data prepare INPUT... --out DIR [--tokenizer byte|PATH] [--text-key text] [--split-lines]`."""
    parser = argparse.ArgumentParser(
        prog="mop data prepare",
        description="Tokenize .txt / .jsonl / .parquet files (or directories of them) into a token dataset.",
    )
    parser.add_argument("inputs", nargs="+", help="input files or directories (recursed, sorted)")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or the path of a tokenizer.json (default: byte)")
    parser.add_argument("--eos-token", default=None, help="end-of-document token of a tokenizer.json (default: auto)")
    parser.add_argument("--text-key", default="text", help="JSON key / parquet column holding the text (default: text)")
    parser.add_argument("--split-lines", action="store_true", help="each non-empty line of a .txt file is a document")
    parser.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard file (default: 2**26)")
    args = parser.parse_args(argv)
    try:
        out = prepare_dataset(
            args.inputs, args.out, tokenizer_spec=args.tokenizer, text_key=args.text_key,
            shard_tokens=args.shard_tokens, split_lines=args.split_lines, eos_token=args.eos_token,
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"mop data prepare: error: {e}", file=sys.stderr)
        return 1
    meta = json.loads((out / "meta.json").read_text())
    print(
        f"prepared {meta['num_docs']} documents, {meta['num_tokens']} tokens in {len(meta['shards'])} shard(s) "
        f"(tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']}, eos {meta['eos_id']}) -> {out}"
    )
    return 0
