"""Data pipeline: tokenizers, preparation, the stdlib-docs corpus and the packed / synthetic loaders."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mop.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    HFTokenizer,
    PackedLoader,
    SyntheticLoader,
    TokenDataset,
    ensure_default_dataset,
    load_tokenizer,
    prepare_dataset,
    prepare_main,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EOS = ByteTokenizer.eos_id

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Packed sequences carry per-document positions.",
    "ünïcödé ✓ and emoji 🚀 survive the byte round trip",
    "short",
    "x",
    "A much longer document: " + " ".join(f"word{i}" for i in range(60)),
    "Attention never crosses a document boundary, and neither does the loss.",
    "Ulysses sequence parallelism splits one long sequence over D ranks.",
]


def _write_inputs(root: Path, docs: list[str]) -> list[Path]:
    """Half the documents as .txt files (one per file), the rest as one .jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, doc in enumerate(docs[:half]):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    with open(root / "rest.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[half:]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    return sorted(root.glob("*.txt")) + [root / "rest.jsonl"]


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory) -> TokenDataset:
    root = tmp_path_factory.mktemp("byte")
    inputs = _write_inputs(root / "in", DOCS)
    return TokenDataset(prepare_dataset(inputs, root / "ds"))


def _stream(loader: PackedLoader, num_tokens: int) -> np.ndarray:
    """The first `num_tokens` input tokens of a dp_size=1, seq_size=1 loader, in order."""
    out = []
    while sum(len(x) for x in out) < num_tokens:
        out.append(next(loader)["tokens"].reshape(-1).numpy())
    return np.concatenate(out)[:num_tokens]


def _split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    cuts = np.flatnonzero(tokens == eos)
    return [tokens[a + 1 if i else 0 : b].tolist() for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


def _batches(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("tokens", "labels", "positions"):
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.name == "byte"
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (258, 256, 257)
    for text in DOCS + [""]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.encode_batch(DOCS) == [tok.encode(d) for d in DOCS]
    assert tok.decode(tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"  # specials dropped
    assert tok.decode([0xC3]) == "\ufffd"  # truncated UTF-8 becomes the replacement char


def _tiny_bpe(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(DOCS * 3, trainer=trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip_through_prepare(tmp_path):
    tok_path = _tiny_bpe(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(tok_path))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 1 and tok.eos_token == "<|endoftext|>"
    for text in DOCS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.eos_id not in tok.encode(text)  # no special tokens added
    assert tok.encode_batch(DOCS) == [tok.encode(d) for d in DOCS]
    assert HFTokenizer(tmp_path, eos_token="<pad>").eos_id == 0  # a directory works too
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(tok_path, eos_token="<nope>")

    ds = TokenDataset(prepare_dataset(_write_inputs(tmp_path / "in", DOCS), tmp_path / "ds", str(tok_path)))
    assert (ds.vocab_size, ds.eos_id, ds.num_docs) == (tok.vocab_size, 1, len(DOCS))
    stream = _stream(PackedLoader(ds, seq_len=16, batch_size=1, dp_rank=0, dp_size=1), ds.num_tokens)
    assert sorted(tok.decode(d) for d in _split_docs(stream, ds.eos_id)) == sorted(DOCS)


# ---------------------------------------------------------------- preparation


def test_prepare_then_loader_gives_back_documents_exactly(byte_dataset):
    ds = byte_dataset
    assert ds.num_docs == len(DOCS)
    assert ds.num_tokens == sum(len(d.encode()) + 1 for d in DOCS)
    assert sorted(ByteTokenizer().decode(ds.document(i)) for i in range(ds.num_docs)) == sorted(DOCS)
    loader = PackedLoader(ds, seq_len=24, batch_size=3, dp_rank=0, dp_size=1, seed=5)
    assert loader.epoch == 0
    epochs = _stream(loader, 2 * ds.num_tokens)
    assert loader.epoch == loader.sequences_consumed * 24 // ds.num_tokens == 2
    first, second = epochs[: ds.num_tokens], epochs[ds.num_tokens :]
    tok = ByteTokenizer()
    for epoch in (first, second):
        assert sorted(tok.decode(d) for d in _split_docs(epoch, EOS)) == sorted(DOCS)
    assert not np.array_equal(first, second)  # each epoch has its own document order


def test_prepare_txt_split_lines_and_directory_recursion(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "b.txt").write_text("line one\n\nline two\n")
    (tmp_path / "in" / "sub" / "a.txt").write_text("nested doc")
    (tmp_path / "in" / "README.md").write_text("skipped: not an input kind")
    (tmp_path / "in" / ".hidden.txt").write_text("skipped: hidden")
    ds = TokenDataset(prepare_dataset([tmp_path / "in"], tmp_path / "lines", split_lines=True))
    docs = [ByteTokenizer().decode(ds.document(i)) for i in range(ds.num_docs)]
    assert docs == ["line one", "line two", "nested doc"]  # sorted paths: b.txt < sub/a.txt
    whole = TokenDataset(prepare_dataset([tmp_path / "in" / "b.txt"], tmp_path / "whole"))
    assert ByteTokenizer().decode(whole.document(0)) == "line one\n\nline two\n"


def test_prepare_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "d.parquet")
    ds = TokenDataset(prepare_dataset([tmp_path / "d.parquet"], tmp_path / "ds", text_key="body"))
    assert [ByteTokenizer().decode(ds.document(i)) for i in range(ds.num_docs)] == DOCS
    with pytest.raises(ValueError, match="no column 'text'"):
        prepare_dataset([tmp_path / "d.parquet"], tmp_path / "ds2")


def test_shard_format_and_multi_shard_reads(tmp_path, byte_dataset):
    inputs = _write_inputs(tmp_path / "in", DOCS)
    ds = TokenDataset(prepare_dataset(inputs, tmp_path / "ds", shard_tokens=50))
    meta = json.loads((ds.path / "meta.json").read_text())
    assert len(meta["shards"]) == -(-ds.num_tokens // 50) and meta["format_version"] == 1
    raw = np.concatenate([np.memmap(ds.path / s["file"], dtype="<u4", mode="r") for s in meta["shards"]])
    offsets = np.load(ds.path / "docs.npy")
    assert offsets.dtype == np.int64 and offsets[-1] == raw.size == ds.num_tokens
    assert np.array_equal(raw[offsets[1:] - 1], np.full(ds.num_docs, EOS))  # every document ends in eos
    one_shard = PackedLoader(byte_dataset, 20, 2, 0, 1, seed=3)
    many_shards = PackedLoader(ds, 20, 2, 0, 1, seed=3)
    _assert_batches_equal(_batches(one_shard, 8), _batches(many_shards, 8))


def test_prepare_replaces_existing_dataset_and_cli(tmp_path, capsys):
    inputs = _write_inputs(tmp_path / "in", DOCS)
    out = tmp_path / "ds"
    assert prepare_main([str(p) for p in inputs] + ["--out", str(out)]) == 0
    assert f"{len(DOCS)} documents" in capsys.readouterr().out
    assert prepare_main([str(inputs[0]), "--out", str(out)]) == 0  # replaces the dataset
    assert TokenDataset(out).num_docs == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert prepare_main([str(tmp_path / "missing.txt"), "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_prepare_errors(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "file").write_text("mine")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_dataset([tmp_path / "nope.txt"], tmp_path / "o1")
    with pytest.raises(ValueError, match="unknown extension '.csv'"):
        prepare_dataset([tmp_path / "a.csv"], tmp_path / "o2")
    (tmp_path / "no_inputs").mkdir()
    with pytest.raises(ValueError, match="no .txt, .jsonl or .parquet files found"):
        prepare_dataset([tmp_path / "no_inputs"], tmp_path / "o0")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare_dataset([tmp_path / "empty.txt"], tmp_path / "o3")
    with pytest.raises(ValueError, match="key 'text'"):
        prepare_dataset([tmp_path / "bad.jsonl"], tmp_path / "o4")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        prepare_dataset([tmp_path / "bad.jsonl"], tmp_path / "occupied", text_key="body")
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        prepare_dataset([tmp_path / "bad.jsonl"], tmp_path / "o5", tokenizer_spec=str(tmp_path / "tok.json"))
    assert not (tmp_path / "o3").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_refuses_vocab_beyond_uint32(tmp_path, monkeypatch):
    import mop.data.prepare as prepare_module

    class HugeVocab(ByteTokenizer):
        vocab_size = 2**32 + 1

    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda spec, eos_token=None: HugeVocab())
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError, match="does not fit the uint32"):
        prepare_dataset([tmp_path / "a.txt"], tmp_path / "ds")


# ---------------------------------------------------------------- loader


@pytest.mark.parametrize("seq_len", [7, 32, 1500])  # 1500: one window spans several epochs
def test_labels_and_positions_mark_document_boundaries(byte_dataset, seq_len):
    loader = PackedLoader(byte_dataset, seq_len=seq_len, batch_size=2, dp_rank=0, dp_size=1, seed=1)
    num_batches = max(4, -(-2 * byte_dataset.num_tokens // (2 * seq_len)))  # two epochs or more
    for batch in _batches(loader, num_batches):
        tokens, labels, positions = batch["tokens"], batch["labels"], batch["positions"]
        assert tokens.dtype == labels.dtype == positions.dtype == torch.int64
        assert tokens.shape == (2, seq_len)
        # The byte tokenizer never emits eos inside a document: eos inputs are exactly the ends.
        assert torch.equal(labels == IGNORE_INDEX, tokens == EOS)
        keep = labels[:, :-1] != IGNORE_INDEX
        assert torch.equal(labels[:, :-1][keep], tokens[:, 1:][keep])
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = tokens[:, :-1] == EOS
        assert torch.equal(positions == 0, starts)
        assert torch.equal(positions[:, 1:][~starts[:, 1:]], positions[:, :-1][~starts[:, 1:]] + 1)


@pytest.mark.parametrize("seq_size", [2, 4])
def test_sequence_chunks_concatenate_to_full_sequences(byte_dataset, seq_size):
    for dp_rank in range(2):
        full = _batches(PackedLoader(byte_dataset, 16, 3, dp_rank, 2, seed=7), 5)
        chunks = [
            _batches(PackedLoader(byte_dataset, 16, 3, dp_rank, 2, seq_rank=r, seq_size=seq_size, seed=7), 5)
            for r in range(seq_size)
        ]
        for step, want in enumerate(full):
            for key in want:
                got = torch.cat([chunks[r][step][key] for r in range(seq_size)], dim=1)
                assert torch.equal(got, want[key]), (key, step)
    with pytest.raises(ValueError, match="seq_len=18 must be divisible by seq_size=4"):
        PackedLoader(byte_dataset, 18, 1, 0, 1, seq_rank=0, seq_size=4)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_partition_the_global_batch(byte_dataset, dp_size):
    reference = _batches(PackedLoader(byte_dataset, 12, 2 * dp_size, 0, 1, seed=2), 4)
    per_rank = [_batches(PackedLoader(byte_dataset, 12, 2, r, dp_size, seed=2), 4) for r in range(dp_size)]
    for step, want in enumerate(reference):
        rows = torch.cat([per_rank[r][step]["tokens"] for r in range(dp_size)])
        assert torch.equal(rows, want["tokens"])
        assert len({tuple(row.tolist()) for row in rows}) == rows.shape[0]  # distinct sequences
        for key in ("labels", "positions"):
            assert torch.equal(torch.cat([per_rank[r][step][key] for r in range(dp_size)]), want[key])


@pytest.mark.parametrize("make", ["packed", "synthetic"])
def test_resume_is_exact_and_state_is_rank_independent(byte_dataset, make):
    def new(dp_rank=0, dp_size=2, batch_size=2):
        if make == "packed":
            return PackedLoader(byte_dataset, 10, batch_size, dp_rank, dp_size, seed=4)
        return SyntheticLoader(50, 10, batch_size, dp_rank, dp_size, seed=4, doc_len=3)

    k, n = 9, 6
    uninterrupted = new()
    expected = _batches(uninterrupted, k + n)[k:]
    interrupted = new()
    _batches(interrupted, k)
    state = json.loads(json.dumps(interrupted.state_dict()))  # small and JSON-serialisable
    other_rank = new(dp_rank=1)
    _batches(other_rank, k)
    assert other_rank.state_dict() == state
    resumed = new()
    resumed.load_state_dict(state)
    _assert_batches_equal(_batches(resumed, n), expected)

    # Elastic: the same global batch on one rank continues with the same sequences.
    both = [new(r) for r in range(2)]
    for loader in both:
        loader.load_state_dict(state)
    single = new(dp_rank=0, dp_size=1, batch_size=4)
    single.load_state_dict(state)
    for _ in range(3):
        want = [next(loader)["tokens"] for loader in both]
        assert torch.equal(next(single)["tokens"], torch.cat(want))

    with pytest.raises(ValueError, match="seed"):
        (PackedLoader(byte_dataset, 10, 2, 0, 2, seed=5) if make == "packed"
         else SyntheticLoader(50, 10, 2, 0, 2, seed=5, doc_len=3)).load_state_dict(state)


def test_determinism_and_seed(byte_dataset):
    a = _batches(PackedLoader(byte_dataset, 16, 2, 1, 2, seed=11), 6)
    b = _batches(PackedLoader(TokenDataset(byte_dataset.path), 16, 2, 1, 2, seed=11), 6)
    _assert_batches_equal(a, b)
    c = _batches(PackedLoader(byte_dataset, 16, 2, 1, 2, seed=12), 6)
    assert any(not torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_loader_errors(tmp_path, byte_dataset):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenDataset(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenDataset(tmp_path / "plain")
    inputs = _write_inputs(tmp_path / "in", DOCS)
    ds_dir = prepare_dataset(inputs, tmp_path / "ds")
    shard = ds_dir / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match="holds .* bytes"):
        TokenDataset(ds_dir)
    ds_dir = prepare_dataset(inputs, tmp_path / "ds")
    (ds_dir / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        TokenDataset(ds_dir)
    for kwargs, match in [
        (dict(dp_rank=2, dp_size=2), r"dp_rank must be in \[0, dp_size=2\)"),
        (dict(seq_len=0), "seq_len must be"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(seed=-1), "seed must be"),
    ]:
        args = dict(seq_len=8, batch_size=1, dp_rank=0, dp_size=1) | kwargs
        with pytest.raises(ValueError, match=match):
            PackedLoader(byte_dataset, **args)
    loader = PackedLoader(byte_dataset, 8, 1, 0, 1)
    with pytest.raises(ValueError, match="seq_len"):
        loader.load_state_dict(PackedLoader(byte_dataset, 16, 1, 0, 1).state_dict())


def test_synthetic_loader_format():
    vocab, seq_len = 37, 12
    one_doc = next(SyntheticLoader(vocab, seq_len, 3, 0, 1, seed=1))
    assert torch.equal(one_doc["positions"], torch.arange(seq_len).expand(3, -1))
    assert (one_doc["labels"] != IGNORE_INDEX).all() and one_doc["tokens"].max() < vocab
    assert torch.equal(one_doc["labels"][:, :-1], one_doc["tokens"][:, 1:])
    packed = next(SyntheticLoader(vocab, seq_len, 3, 0, 1, seed=1, doc_len=5))
    assert torch.equal(packed["tokens"], one_doc["tokens"])
    assert torch.equal(packed["positions"][0], torch.arange(seq_len) % 5)
    assert torch.equal(packed["labels"] == IGNORE_INDEX, (torch.arange(seq_len) % 5 == 4).expand(3, -1))
    chunks = [next(SyntheticLoader(vocab, seq_len, 3, 0, 1, seq_rank=r, seq_size=3, seed=1, doc_len=5))
              for r in range(3)]
    for key in packed:
        assert torch.equal(torch.cat([c[key] for c in chunks], dim=1), packed[key])
    ranks = [next(SyntheticLoader(vocab, seq_len, 1, r, 3, seed=1)) for r in range(3)]
    assert torch.equal(torch.cat([b["tokens"] for b in ranks]), one_doc["tokens"])


# ---------------------------------------------------------------- default corpus


def test_ensure_default_dataset_is_fast_deterministic_and_reused(tmp_path):
    start = time.perf_counter()
    path = ensure_default_dataset(tmp_path / "a")
    assert time.perf_counter() - start < 20
    ds = TokenDataset(path)
    assert ds.num_tokens >= 500_000 and ds.num_docs > 500 and ds.vocab_size == 258
    assert path == tmp_path / "a" / "stdlib-docs-byte"
    mtime = (path / "meta.json").stat().st_mtime_ns
    assert ensure_default_dataset(tmp_path / "a") == path
    assert (path / "meta.json").stat().st_mtime_ns == mtime  # reused, not rebuilt

    # A fresh interpreter builds byte-identical files.
    code = f"from mop.data import ensure_default_dataset; ensure_default_dataset({str(tmp_path / 'b')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
    other = tmp_path / "b" / "stdlib-docs-byte"
    for name in ["docs.npy", "meta.json"] + [s["file"] for s in ds.meta["shards"]]:
        assert (path / name).read_bytes() == (other / name).read_bytes(), name

    # A corrupt cache is rebuilt.
    (other / "docs.npy").write_bytes(b"garbage")
    ensure_default_dataset(tmp_path / "b")
    assert (other / "docs.npy").read_bytes() == (path / "docs.npy").read_bytes()
    text = ByteTokenizer().decode(ds.document(0))
    assert text.startswith("Module abc") and "\ufffd" not in text
