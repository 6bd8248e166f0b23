"""Reading prepared token datasets and packing them into training batches.

Packing. Each epoch visits every document once, in an order shuffled by `(seed, epoch)`. The
documents of epoch 0, then epoch 1, ... form one endless token stream. Window `g` ("global
sequence g") is the `seq_len + 1` tokens `stream[g * seq_len : (g + 1) * seq_len + 1]`: windows
overlap by one token, so every stream token is an input exactly once and every within-document
transition is a training target exactly once. A document that does not fit the rest of a window
is split: its remainder opens the next window as a new document (positions restart at 0 there).
Inside a window, inputs are `window[:-1]`, labels `window[1:]`, with -100 wherever input and
target lie in different documents, and `positions` count from 0 at each document start (the
attention kernel's document-start marker).

Distribution. Global step `s` consumes sequences `[s * B * dp_size, (s + 1) * B * dp_size)`;
data-parallel rank `r` takes the block `r * B .. r * B + B - 1` of them. Ranks of one sequence
group (same `dp_rank`) take the same sequences and keep columns
`[seq_rank * N, (seq_rank + 1) * N)`, `N = seq_len // seq_size`; positions and labels are computed
on the whole window first, so chunks carry global positions. Nothing is communicated: every rank
derives the same windows from `(seed, sequence index)`.

Resume. The state is the number of global sequences consumed (plus the seed, seq_len and
dataset size to catch mismatches). It does not depend on the rank, so a checkpoint resumes
exactly with the same layout, and also with a different `dp_size`, `batch_size` or `seq_size`:
then the next global step simply starts at the first unconsumed sequence (nothing skipped or
repeated). Changing `seq_len`, the seed or the dataset is refused.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path

import numpy as np
import torch

from .prepare import FORMAT_NAME, FORMAT_VERSION, TOKEN_DTYPE

IGNORE_INDEX = -100
_STATE_VERSION = 1


class TokenDataset:
    """A prepared dataset directory: memory-mapped token shards, document offsets and metadata.

    Raises FileNotFoundError when the directory or one of its files is missing and ValueError
    when the files disagree with meta.json (truncated shard, wrong format, bad offsets).
    """

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir)
        hint = "prepare one with `mop data prepare INPUT... --out DIR`"
        if not self.path.is_dir():
            raise FileNotFoundError(f"dataset directory {str(self.path)!r} does not exist; {hint}")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{str(self.path)!r} is not a prepared dataset (no meta.json); {hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{meta_path} is corrupt ({e}); prepare the dataset again") from None
        self.meta = meta
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{meta_path} does not describe a {FORMAT_NAME!r} dataset; {hint}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path} has format_version {meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; prepare the dataset again"
            )
        try:
            self.vocab_size = int(meta["vocab_size"])
            self.eos_id = int(meta["eos_id"])
            self.num_tokens = int(meta["num_tokens"])
            self.num_docs = int(meta["num_docs"])
            self.tokenizer_spec = str(meta["tokenizer"])
            shards = [(str(s["file"]), int(s["num_tokens"])) for s in meta["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{meta_path} is missing or has a malformed field ({e!r}); prepare the dataset again"
            ) from None

        self._shards: list[np.memmap] = []
        for name, count in shards:
            shard_path = self.path / name
            if not shard_path.is_file():
                raise FileNotFoundError(f"dataset shard {shard_path} is missing; prepare the dataset again")
            size = shard_path.stat().st_size
            if count < 1 or size != count * TOKEN_DTYPE.itemsize:
                raise ValueError(
                    f"dataset shard {shard_path} holds {size} bytes, meta.json says {count} tokens "
                    f"({count * TOKEN_DTYPE.itemsize} bytes); prepare the dataset again"
                )
            self._shards.append(np.memmap(shard_path, dtype=TOKEN_DTYPE, mode="r"))
        counts = np.array([c for _, c in shards], dtype=np.int64)
        # shard_starts[i] is the global index of shard i's first token; the last entry is the total.
        self._shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._shard_starts[-1] != self.num_tokens:
            raise ValueError(
                f"{self.path}: shards hold {self._shard_starts[-1]} tokens, meta.json says {self.num_tokens}; "
                "prepare the dataset again"
            )

        docs_path = self.path / "docs.npy"
        if not docs_path.is_file():
            raise FileNotFoundError(f"{docs_path} is missing; prepare the dataset again")
        try:
            doc_offsets = np.load(docs_path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{docs_path} is corrupt ({e}); prepare the dataset again") from None
        if (
            doc_offsets.dtype != np.int64 or doc_offsets.shape != (self.num_docs + 1,) or self.num_docs < 1
            or doc_offsets[0] != 0 or doc_offsets[-1] != self.num_tokens or not np.all(np.diff(doc_offsets) > 0)
        ):
            raise ValueError(
                f"{docs_path} does not hold {self.num_docs + 1} increasing int64 offsets from 0 to "
                f"{self.num_tokens}; prepare the dataset again"
            )
        self.doc_offsets = doc_offsets

    def __len__(self) -> int:
        return self.num_docs

    @property
    def doc_lengths(self) -> np.ndarray:
        """int64 [num_docs]: tokens per document, eos included."""
        return np.diff(self.doc_offsets)

    def gather(self, index: np.ndarray) -> np.ndarray:
        """int64 tokens at global stream indices `index` (any shape)."""
        index = np.asarray(index, dtype=np.int64)
        if len(self._shards) == 1:
            return self._shards[0][index].astype(np.int64)
        out = np.empty(index.shape, dtype=np.int64)
        shard_of = np.searchsorted(self._shard_starts, index, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self._shards[shard][index[mask] - self._shard_starts[shard]]
        return out

    def read(self, start: int, end: int) -> np.ndarray:
        """int64 tokens `[start, end)` of the concatenated stream."""
        return self.gather(np.arange(start, end, dtype=np.int64))

    def document(self, i: int) -> np.ndarray:
        """int64 tokens of document `i`, its trailing eos included."""
        return self.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, docs={self.num_docs}, tokens={self.num_tokens}, "
                f"vocab_size={self.vocab_size}, tokenizer={self.tokenizer_spec!r})")


def _check_int(name: str, value, low: int, high: int | None = None, valid: str = "") -> int:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_int or value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be {valid or f'an integer >= {low}'}, got {value!r}")
    return int(value)


class _SequenceLoader(abc.ABC):
    """Batching, rank layout and resume state shared by the packed and synthetic loaders.

    Subclasses provide `_window_chunk(g, c0, c1)`: tokens of columns `[c0, c1)` of global
    sequence `g` (a window of seq_len + 1 tokens) and, for columns `[c0, c1 - 1)`, the position
    of each token within its document and whether the next token starts a new document.
    """

    kind = "base"

    def __init__(self, seq_len, batch_size, dp_rank, dp_size, seq_rank, seq_size, seed):
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.dp_size = _check_int("dp_size", dp_size, 1)
        self.dp_rank = _check_int("dp_rank", dp_rank, 0, self.dp_size, f"in [0, dp_size={self.dp_size})")
        self.seq_size = _check_int("seq_size", seq_size, 1)
        self.seq_rank = _check_int("seq_rank", seq_rank, 0, self.seq_size, f"in [0, seq_size={self.seq_size})")
        self.seed = _check_int("seed", seed, 0, None, "a non-negative integer")
        if self.seq_len % self.seq_size:
            raise ValueError(
                f"seq_len={self.seq_len} must be divisible by seq_size={self.seq_size} so every rank of a "
                f"sequence group holds an equal chunk; pick seq_len a multiple of {self.seq_size}"
            )
        self.chunk_len = self.seq_len // self.seq_size
        self.sequences_consumed = 0

    @property
    def global_batch_size(self) -> int:
        """Sequences per global step (all data-parallel ranks)."""
        return self.batch_size * self.dp_size

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per global step, over all ranks."""
        return self.global_batch_size * self.seq_len

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        """This rank's batch of the next global step: int64 `tokens`, `labels`, `positions` [B, N]."""
        first = self.sequences_consumed + self.dp_rank * self.batch_size
        c0 = self.seq_rank * self.chunk_len
        c1 = c0 + self.chunk_len + 1  # one extra column: the last input's target
        tokens_BN = np.empty((self.batch_size, self.chunk_len), dtype=np.int64)
        labels_BN = np.empty_like(tokens_BN)
        positions_BN = np.empty_like(tokens_BN)
        for b in range(self.batch_size):
            window, positions, next_is_new_doc = self._window_chunk(first + b, c0, c1)
            tokens_BN[b] = window[:-1]
            labels_BN[b] = np.where(next_is_new_doc, IGNORE_INDEX, window[1:])
            positions_BN[b] = positions
        self.sequences_consumed += self.global_batch_size
        return {
            "tokens": torch.from_numpy(tokens_BN),
            "labels": torch.from_numpy(labels_BN),
            "positions": torch.from_numpy(positions_BN),
        }

    def _fingerprint(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        """Small, rank-independent resume state (see the module docstring for what may change)."""
        return {"kind": self.kind, "version": _STATE_VERSION, "sequences_consumed": self.sequences_consumed,
                "seed": self.seed, "seq_len": self.seq_len, **self._fingerprint()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue from `state_dict`; the next batch is the one the saved loader would have produced."""
        expected = {"kind": self.kind, "version": _STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len,
                    **self._fingerprint()}
        for key, value in expected.items():
            if key not in state_dict:
                raise ValueError(f"loader state is missing {key!r}; expected a state_dict() of {type(self).__name__}")
            if state_dict[key] != value:
                raise ValueError(
                    f"loader state has {key}={state_dict[key]!r} but this loader has {key}={value!r}; "
                    f"resume with the same {key} (dp_size, batch_size and seq_size may change)"
                )
        consumed = int(state_dict["sequences_consumed"])
        if consumed < 0:
            raise ValueError(f"loader state has negative sequences_consumed={consumed}")
        self.sequences_consumed = consumed

    @abc.abstractmethod
    def _window_chunk(self, g: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(int64 tokens [c1 - c0], int64 positions [c1 - c0 - 1], bool next_is_new_doc [c1 - c0 - 1])."""


class PackedLoader(_SequenceLoader):
    """Endless iterator of packed, document-masked batches from a `TokenDataset` (see module doc)."""

    kind = "packed"
    _EPOCH_CACHE = 2  # a window spans at most two epochs unless the dataset is shorter than it

    def __init__(self, dataset: TokenDataset | str | Path, seq_len: int, batch_size: int, dp_rank: int,
                 dp_size: int, seq_rank: int = 0, seq_size: int = 1, seed: int = 0):
        super().__init__(seq_len, batch_size, dp_rank, dp_size, seq_rank, seq_size, seed)
        self.dataset = dataset if isinstance(dataset, TokenDataset) else TokenDataset(dataset)
        self._doc_lengths = self.dataset.doc_lengths
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _fingerprint(self) -> dict:
        return {"num_tokens": self.dataset.num_tokens, "num_docs": self.dataset.num_docs}

    @property
    def epoch(self) -> int:
        """The epoch the next token comes from."""
        return self.sequences_consumed * self.seq_len // self.dataset.num_tokens

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, int64 start of each ordered document in the epoch plus the end)."""
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.dataset.num_docs)
            if self.dataset.num_docs < 2**31:
                order = order.astype(np.int32)  # halves the per-epoch cache on large corpora
            starts = np.concatenate([[0], np.cumsum(self._doc_lengths[order])]).astype(np.int64)
            if len(self._epoch_cache) >= self._EPOCH_CACHE:
                del self._epoch_cache[min(self._epoch_cache)]
            self._epoch_cache[epoch] = (order, starts)
        return self._epoch_cache[epoch]

    def _window_segments(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Document pieces of window g: (start column of each piece, its first token's stream index)."""
        total = self.dataset.num_tokens
        lo = g * self.seq_len
        hi = lo + self.seq_len + 1
        seg_cols, seg_tokens = [], []
        p = lo
        while p < hi:
            epoch, offset = divmod(p, total)
            order, starts = self._epoch_layout(epoch)
            end = min(total, offset + hi - p)
            first = np.searchsorted(starts, offset, side="right") - 1
            last = np.searchsorted(starts, end, side="left")  # ordered docs starting before `end`
            k = np.arange(first, last)
            piece_start = np.maximum(starts[k], offset)
            seg_cols.append(piece_start - offset + (p - lo))
            seg_tokens.append(self.dataset.doc_offsets[order[k]] + (piece_start - starts[k]))
            p += end - offset
        return np.concatenate(seg_cols), np.concatenate(seg_tokens)

    def _window_chunk(self, g, c0, c1):
        seg_cols, seg_tokens = self._window_segments(g)
        cols = np.arange(c0, c1, dtype=np.int64)
        seg = np.searchsorted(seg_cols, cols, side="right") - 1
        window = self.dataset.gather(seg_tokens[seg] + (cols - seg_cols[seg]))
        positions = cols[:-1] - seg_cols[seg[:-1]]
        # Pieces, not document ids: the same document can end one epoch and open the next.
        next_is_new_doc = seg[1:] != seg[:-1]
        return window, positions, next_is_new_doc


class SyntheticLoader(_SequenceLoader):
    """Uniform random tokens in the same batch format, for benchmarks; no dataset needed.

    Sequence g is drawn from `(seed, g)`, so every rank of a sequence group sees the same
    sequence. `doc_len=None` makes each sequence one document; otherwise documents of `doc_len`
    tokens are packed back to back (positions restart, labels masked at each boundary).
    """

    kind = "synthetic"

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 seq_rank: int = 0, seq_size: int = 1, seed: int = 0, doc_len: int | None = None):
        super().__init__(seq_len, batch_size, dp_rank, dp_size, seq_rank, seq_size, seed)
        self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        self.doc_len = None if doc_len is None else _check_int("doc_len", doc_len, 1, None, "None or an integer >= 1")

    def _fingerprint(self) -> dict:
        return {"vocab_size": self.vocab_size, "doc_len": self.doc_len}

    def _window_chunk(self, g, c0, c1):
        rng = np.random.default_rng([self.seed, g])
        window = rng.integers(0, self.vocab_size, size=self.seq_len + 1, dtype=np.int64)[c0:c1]
        cols = np.arange(c0, c1 - 1, dtype=np.int64)
        if self.doc_len is None:
            return window, cols, np.zeros(cols.shape, dtype=bool)
        return window, cols % self.doc_len, (cols + 1) % self.doc_len == 0
