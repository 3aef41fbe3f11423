"""Synthetic recall tasks, generated from a seed (nothing is downloaded).

Every task yields `inputs, targets [B, T]` (int64 token ids below `vocab_needed`) where
`targets[b, t]` is what the model must output after reading `inputs[b, :t + 1]` at a *query*
position and `IGNORE` (−100, cross-entropy's ignore index) everywhere else, so the loss and the
accuracy see query positions only.

- `mqar` — multi-query associative recall (Zoology, Arora et al. 2023): `pairs` key–value pairs
  `k₁ v₁ … k_n v_n`, then every key once more, in random order, at power-law distributed offsets
  in a region of noise tokens; the target at a queried key is its value. Ids: keys
  `[0, n_k)`, values `[n_k, 2n_k)`, noise `[2n_k, vocab)` with `n_k = (vocab − noise) // 2`;
  keys and values are drawn without replacement, and the noise never holds a key or value, so
  each query has exactly one answer in its context.
- `niah-single` — passkey retrieval (Mohtashami & Jaggi 2023), in bytes: a haystack of repeated
  filler sentences, the sentence "The pass key is 12345. Remember it. …" inserted at a sentence
  boundary at fractional depth `depth` (uniform per example when unset), and at the end the
  question and the key, teacher-forced; the targets are the key's digits.
- `niah-multikey` — `needles` sentences "The magic number for abcd is 1234567." with distinct
  random keys in the same haystack; the question names one of them (RULER's multi-key needle).
- `selective-copy` — Mamba's selective copying (Gu & Dao 2023): `tokens` data tokens at random
  positions among blanks, then `tokens` marker tokens; the target at the i-th marker is the i-th
  data token. Ids: data `[0, vocab)`, blank `vocab`, marker `vocab + 1`.

Batches are a pure function of `(seed, split, step)`: training and evaluation draw from
disjoint streams of the same seed. Each task has an `oracle` that answers its queries from the
inputs alone (exact recall), which the tests use to check that the targets are answerable.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

IGNORE = -100
SPLITS = {"train": 0, "eval": 1}


def _rng(seed: int, split: str, step: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return np.random.default_rng([seed, SPLITS[split], step])


def _positive_int(task: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{task}: {name} must be an integer >= {minimum}, got {value!r}")


def _sample_without_replacement(rng: np.random.Generator, rows: int, population: int, size: int,
                                log_p: np.ndarray | None = None) -> np.ndarray:
    """[rows, size] distinct draws from `range(population)` per row, with probabilities
    `exp(log_p)` (Gumbel top-k: the same law as drawing one at a time without replacement)."""
    keys = rng.gumbel(size=(rows, population))
    if log_p is not None:
        keys = keys + log_p
    return np.argsort(-keys, axis=1, kind="stable")[:, :size]


class Task(abc.ABC):
    """Shared interface: `batch`, `oracle`, `chance`, `vocab_needed`, `seq_len`."""

    name: ClassVar[str]
    seq_len: int

    @property
    @abc.abstractmethod
    def vocab_needed(self) -> int:
        """One more than the largest id the task uses."""

    @property
    @abc.abstractmethod
    def chance(self) -> float:
        """Expected accuracy of a guess that ignores the context (answers are uniform)."""

    @abc.abstractmethod
    def answer_ids(self) -> np.ndarray:
        """The ids an answer can take (a constant guesser picks one of them)."""

    @property
    @abc.abstractmethod
    def queries_per_example(self) -> int:
        """Query positions in every sequence."""

    @abc.abstractmethod
    def generate(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """`inputs, targets` as int64 arrays [batch_size, seq_len], drawn from `rng`."""

    def batch(self, batch_size: int, *, seed: int, step: int = 0, split: str = "train",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """`inputs, targets [batch_size, seq_len]` int64 for `(seed, split, step)`."""
        _positive_int(self.name, "batch_size", batch_size)
        x, y = (torch.from_numpy(a) for a in self.generate(_rng(seed, split, step), batch_size))
        if torch.device(device).type == "cuda":
            # pinned and asynchronous: a pageable copy would wait for the GPU's queued step
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    @abc.abstractmethod
    def oracle(self, inputs: np.ndarray) -> np.ndarray:
        """Exact-recall answers from the inputs alone: [B, T], −1 where no query is recognised."""

    def params(self) -> dict:
        return dataclasses.asdict(self)


def _continuation(seq: np.ndarray, t: int) -> int:
    """The token that followed the longest earlier match of the suffix `seq[:t + 1]` (the
    induction rule, carried to any length): what an exact-recall model answers at `t`."""
    cands = np.flatnonzero(seq[:t] == seq[t])
    length = 1
    while len(cands) > 1 and length <= t:
        ok = cands >= length
        ok[ok] = seq[cands[ok] - length] == seq[t - length]
        if not ok.any():
            break
        cands, length = cands[ok], length + 1
    return int(seq[cands[-1] + 1]) if len(cands) else -1


@dataclass(frozen=True)
class MQAR(Task):
    name: ClassVar[str] = "mqar"
    seq_len: int = 256
    pairs: int = 32
    vocab: int = 256
    noise: int = 16  # ids reserved for the filler between queries
    power_a: float = 0.01  # gap law p(g) ∝ g^(a−1), Zoology's default

    def __post_init__(self):
        for field in ("seq_len", "pairs", "vocab", "noise"):
            _positive_int(self.name, field, getattr(self, field))
        if self.n_keys < self.pairs:
            raise ValueError(f"mqar: pairs = {self.pairs} needs that many distinct keys, but vocab = {self.vocab} "
                             f"with noise = {self.noise} leaves {self.n_keys}")
        if (self.seq_len - 2 * self.pairs) // 2 < self.pairs:
            raise ValueError(f"mqar: seq_len = {self.seq_len} is too short for pairs = {self.pairs} "
                             f"(needs at least {4 * self.pairs}: the pairs, then room for every query)")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"mqar: power_a must be in (0, 1], got {self.power_a!r}")

    @property
    def n_keys(self) -> int:
        return (self.vocab - self.noise) // 2

    @property
    def vocab_needed(self) -> int:
        return self.vocab

    @property
    def chance(self) -> float:
        return 1.0 / self.n_keys

    def answer_ids(self) -> np.ndarray:
        return np.arange(self.n_keys, 2 * self.n_keys)

    @property
    def queries_per_example(self) -> int:
        return self.pairs

    def generate(self, rng, batch_size):
        n, B, T, nk = self.pairs, batch_size, self.seq_len, self.n_keys
        keys = _sample_without_replacement(rng, B, nk, n)
        values = nk + _sample_without_replacement(rng, B, nk, n)
        x = rng.integers(2 * nk, self.vocab, size=(B, T))
        x[:, 0:2 * n:2], x[:, 1:2 * n:2] = keys, values
        space = (T - 2 * n) // 2
        g = np.arange(1, space + 1, dtype=np.float64)
        log_p = np.log(self.power_a) + (self.power_a - 1) * np.log(g)
        where = 2 * n + 2 * _sample_without_replacement(rng, B, space, n, log_p)
        rows = np.arange(B)[:, None]
        x[rows, where] = keys
        y = np.full((B, T), IGNORE, dtype=np.int64)
        y[rows, where] = values
        return x.astype(np.int64), y

    def oracle(self, inputs):
        out = np.full(inputs.shape, -1, dtype=np.int64)
        for b, seq in enumerate(inputs):
            for t in np.flatnonzero(seq < self.n_keys):
                if t >= 2 * self.pairs:
                    out[b, t] = _continuation(seq, t)
        return out


_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@functools.lru_cache(maxsize=16)
def _haystack(length: int) -> tuple[str, np.ndarray]:
    """`length` bytes of repeated filler ending with a whole sentence (so the question starts
    a sentence), and the offsets where a sentence starts."""
    full = _FILLER * (length // len(_FILLER) + 1)
    text = full[len(full) - length:]
    starts = [0] + [i + 2 for i in range(length - 2) if text[i:i + 2] == ". "]
    return text, np.asarray(starts)


def _encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64)


def _check_depth(task: str, depth) -> None:
    if depth is not None and not (isinstance(depth, (int, float)) and 0 <= depth <= 1):
        raise ValueError(f"{task}: depth must be a fraction in [0, 1] (or unset for a uniform depth), got {depth!r}")


def _digits(rng: np.random.Generator, count: int) -> str:
    return "".join(map(str, rng.integers(0, 10, size=count)))


class _Needles(Task):
    """A byte-level haystack with needle sentences and a final teacher-forced answer."""

    digits: int
    depth: float | None

    @property
    def vocab_needed(self) -> int:
        return 128  # ASCII

    @property
    def chance(self) -> float:
        return 0.1

    def answer_ids(self) -> np.ndarray:
        return _encode("0123456789")

    @property
    def queries_per_example(self) -> int:
        return self.digits

    def _compose(self, rng, needles: list[str], question: str) -> np.ndarray:
        """The stream of `seq_len + 1` bytes: haystack with the needles at sentence starts,
        then `question` (which ends with the answer)."""
        hay_len = self.seq_len + 1 - sum(map(len, needles)) - len(question)
        hay, starts = _haystack(hay_len)
        if self.depth is None:
            depths = rng.random(len(needles))
        else:
            depths = np.full(len(needles), float(self.depth))
        # Distinct sentence starts nearest to the wanted depths, so needles never overlap.
        slots = np.abs(starts[None, :] - depths[:, None] * hay_len).argsort(axis=1)
        chosen: list[int] = []
        for row in slots:
            chosen.append(next(int(starts[j]) for j in row if int(starts[j]) not in chosen))
        parts, last = [], 0
        for at, needle in sorted(zip(chosen, needles)):
            parts += [hay[last:at], needle]
            last = at
        parts += [hay[last:], question]
        return _encode("".join(parts))

    @abc.abstractmethod
    def _min_len(self) -> int:
        """The shortest `seq_len` that holds the needles and the question."""

    def _check(self) -> None:
        _positive_int(self.name, "digits", self.digits)
        _check_depth(self.name, self.depth)
        _positive_int(self.name, "seq_len", self.seq_len)
        if self.seq_len < self._min_len():
            raise ValueError(f"{self.name}: seq_len = {self.seq_len} is shorter than the needles and the question "
                             f"({self._min_len()} bytes)")

    def _to_batch(self, streams: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        s = np.stack(streams)
        x, y = s[:, :-1].copy(), s[:, 1:].copy()
        y[:, :-self.digits] = IGNORE
        return x, y

    def oracle(self, inputs):
        out = np.full(inputs.shape, -1, dtype=np.int64)
        T = inputs.shape[1]
        for b, seq in enumerate(inputs):
            for t in range(T - self.digits, T):
                out[b, t] = _continuation(seq, t)
        return out


@dataclass(frozen=True)
class NeedleSingle(_Needles):
    name: ClassVar[str] = "niah-single"
    seq_len: int = 1024
    digits: int = 5
    depth: float | None = None

    NEEDLE: ClassVar[str] = "The pass key is {key}. Remember it. {key} is the pass key. "
    QUESTION: ClassVar[str] = "What is the pass key? The pass key is {key}"

    def __post_init__(self):
        self._check()

    def _min_len(self) -> int:
        return len(self.NEEDLE.format(key="0" * self.digits)) + len(self.QUESTION.format(key="0" * self.digits)) + 8

    def generate(self, rng, batch_size):
        streams = []
        for _ in range(batch_size):
            key = _digits(rng, self.digits)
            streams.append(self._compose(rng, [self.NEEDLE.format(key=key)], self.QUESTION.format(key=key)))
        return self._to_batch(streams)


@dataclass(frozen=True)
class NeedleMultiKey(_Needles):
    name: ClassVar[str] = "niah-multikey"
    seq_len: int = 1024
    needles: int = 4
    digits: int = 7
    key_len: int = 4  # lowercase letters
    depth: float | None = None

    NEEDLE: ClassVar[str] = "The magic number for {key} is {value}. "
    QUESTION: ClassVar[str] = "What is the magic number for {key}? The magic number for {key} is {value}"

    def __post_init__(self):
        _positive_int(self.name, "needles", self.needles)
        _positive_int(self.name, "key_len", self.key_len)
        if self.needles > 26 ** self.key_len:
            raise ValueError(f"{self.name}: needles = {self.needles} exceeds the {26 ** self.key_len} distinct keys "
                             f"of key_len = {self.key_len}")
        self._check()

    def _min_len(self) -> int:
        key, value = "a" * self.key_len, "0" * self.digits
        # a filler sentence is at most 24 bytes, so 24 per needle leaves a sentence start for each
        return (self.needles * len(self.NEEDLE.format(key=key, value=value))
                + len(self.QUESTION.format(key=key, value=value)) + 24 * self.needles)

    def generate(self, rng, batch_size):
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        streams = []
        for _ in range(batch_size):
            keys: list[str] = []
            while len(keys) < self.needles:
                key = "".join(rng.choice(letters, size=self.key_len))
                if key not in keys:
                    keys.append(key)
            values = [_digits(rng, self.digits) for _ in keys]
            asked = int(rng.integers(self.needles))
            needles = [self.NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
            streams.append(self._compose(rng, needles, self.QUESTION.format(key=keys[asked], value=values[asked])))
        return self._to_batch(streams)


@dataclass(frozen=True)
class SelectiveCopy(Task):
    name: ClassVar[str] = "selective-copy"
    seq_len: int = 256
    tokens: int = 16
    vocab: int = 16  # data ids; blank and marker follow them

    def __post_init__(self):
        for field in ("seq_len", "tokens", "vocab"):
            _positive_int(self.name, field, getattr(self, field))
        if self.seq_len < 2 * self.tokens:
            raise ValueError(f"selective-copy: seq_len = {self.seq_len} is too short for tokens = {self.tokens} "
                             f"(needs at least {2 * self.tokens})")

    @property
    def blank(self) -> int:
        return self.vocab

    @property
    def marker(self) -> int:
        return self.vocab + 1

    @property
    def vocab_needed(self) -> int:
        return self.vocab + 2

    @property
    def chance(self) -> float:
        return 1.0 / self.vocab

    def answer_ids(self) -> np.ndarray:
        return np.arange(self.vocab)

    @property
    def queries_per_example(self) -> int:
        return self.tokens

    def generate(self, rng, batch_size):
        B, T, n = batch_size, self.seq_len, self.tokens
        data = rng.integers(0, self.vocab, size=(B, n))
        where = np.sort(_sample_without_replacement(rng, B, T - n, n), axis=1)
        x = np.full((B, T), self.blank, dtype=np.int64)
        x[np.arange(B)[:, None], where] = data
        x[:, T - n:] = self.marker
        y = np.full((B, T), IGNORE, dtype=np.int64)
        y[:, T - n:] = data
        return x, y

    def oracle(self, inputs):
        out = np.full(inputs.shape, -1, dtype=np.int64)
        for b, seq in enumerate(inputs):
            data = seq[(seq != self.blank) & (seq != self.marker)]
            marks = np.flatnonzero(seq == self.marker)
            out[b, marks[:len(data)]] = data[:len(marks)]
        return out


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (MQAR, NeedleSingle, NeedleMultiKey, SelectiveCopy)}


def make_task(name: str, **params) -> Task:
    """The task `name` with `params` (its dataclass fields); unknown names or fields raise
    `ValueError` naming them."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}")
    cls = TASKS[name]
    known = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in known:
            raise ValueError(f"{name}: unknown parameter {key!r} (it takes {', '.join(known)})")
    return cls(**params)


def task_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(TASKS[name])]


__all__ = ["IGNORE", "MQAR", "NeedleSingle", "NeedleMultiKey", "SelectiveCopy", "TASKS", "Task", "make_task",
           "task_fields"]
