"""Where the trainer's micro-batches come from: datasets in memory, or a stream.

    ds = as_token_dataset(dataset, tokenizer, max_length)      # text, token blocks or dicts
    source = MapSource(ds, GlobalBatches(ds, batch_size=16, seed=0, dp_rank=0, dp_size=1), collate)
    source.seek(epoch=0, micro=0)
    batch, epoch, micro = source.next()                       # this rank's slice of one global micro-batch

Data order: a seeded permutation per epoch; global micro-batch ``i`` is the same whatever the
number of data-parallel ranks, and each rank takes its contiguous slice of it. A
:class:`BatchStream` (for example Ray Data) yields this rank's batches itself; resuming
mid-epoch skips the micro-batches already used.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

from ..errors import InputError


def epoch_permutation(num_rows: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The row order of one epoch (seeded, the same on every rank)."""
    if not shuffle:
        return list(range(num_rows))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=g).tolist()


def fetch_rows(dataset: Any, indices: Sequence[int]) -> List[Dict[str, Any]]:
    """Rows ``indices`` of a ``datasets.Dataset`` or a map-style dataset of dicts."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):  # datasets.Dataset
        cols = dataset[list(indices)]
        keys = list(cols.keys())
        return [{k: cols[k][i] for k in keys} for i in range(len(indices))]
    return [dataset[i] for i in indices]


def as_token_dataset(dataset: Any, get_tokenizer: Callable[[], Any], max_length: int, name: str = "dataset") -> Any:
    """A dataset of token rows from a tokenized ``datasets.Dataset``, a map-style dataset of
    dicts with ``input_ids``, or raw text (a ``datasets.Dataset`` with a ``text`` column, a
    list of strings, one string), which is tokenized with ``get_tokenizer()`` and packed into
    ``max_length`` blocks."""
    if dataset is None:
        raise InputError(f"{name} is None")
    if isinstance(dataset, str):
        dataset = [dataset]
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(t, str) for t in dataset):
        from ..data import prepare_moe_dataset

        return prepare_moe_dataset(list(dataset), get_tokenizer(), max_length=max_length)
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):
        cols = list(dataset.column_names)
        if "input_ids" in cols:
            return dataset
        if "text" in cols:
            from ..data import prepare_moe_dataset

            return prepare_moe_dataset(dataset, get_tokenizer(), max_length=max_length)
        raise InputError(f"{name} has neither an 'input_ids' nor a 'text' column; it has {cols}")
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        if len(dataset) == 0:
            raise InputError(f"{name} is empty")
        first = dataset[0]
        if not isinstance(first, dict) or "input_ids" not in first:
            raise InputError(
                f"{name}[0] must be a dict with 'input_ids'; got {type(first).__name__}"
                + (f" with keys {sorted(first)}" if isinstance(first, dict) else "")
            )
        return dataset
    raise InputError(
        f"{name} must be a datasets.Dataset, a map-style dataset of dicts, or text; got {type(dataset).__name__}"
    )


class GlobalBatches:
    """Deterministic global micro-batches of ``batch_size`` rows; this rank's slice of each."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, dp_rank: int, dp_size: int, shuffle: bool = True) -> None:
        self.batch_size, self.seed = batch_size, seed
        self.dp_rank, self.dp_size, self.shuffle = dp_rank, dp_size, shuffle
        self.num_rows = len(dataset)
        self.per_epoch = self.num_rows // batch_size
        if self.per_epoch == 0:
            raise InputError(
                f"the training set has {self.num_rows} rows, fewer than one batch (batch_size={batch_size})"
            )
        self._order_epoch: Optional[int] = None
        self._order: List[int] = []

    def indices(self, epoch: int, micro: int) -> List[int]:
        if self._order_epoch != epoch:
            self._order = epoch_permutation(self.num_rows, self.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        rows = self._order[micro * self.batch_size : (micro + 1) * self.batch_size]
        per_rank = self.batch_size // self.dp_size
        return rows[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]


@runtime_checkable
class BatchStream(Protocol):
    """A streaming source of this rank's collated micro-batches (for example Ray Data).

    ``iter_epoch(epoch)`` yields dicts with ``input_ids``, ``attention_mask`` and ``labels``
    ([local_batch, seq] tensors). Every rank must yield the same number of batches.
    """

    def iter_epoch(self, epoch: int) -> Iterator[Dict[str, torch.Tensor]]: ...


class MicroBatchSource(abc.ABC):
    """A position in the training data, and the micro-batches from there on."""

    @abc.abstractmethod
    def seek(self, epoch: int, micro: int) -> None:
        """Position the source at micro-batch ``micro`` of ``epoch``."""

    @abc.abstractmethod
    def next(self) -> Tuple[Dict[str, Any], int, int]:
        """The next micro-batch and the (epoch, micro) position *after* it."""

    def take(self, n: int) -> Tuple[List[Dict[str, Any]], int, int]:
        """The next ``n`` micro-batches and the position after them."""
        batches, epoch, micro = [], 0, 0
        for _ in range(n):
            batch, epoch, micro = self.next()
            batches.append(batch)
        return batches, epoch, micro


class MapSource(MicroBatchSource):
    """Micro-batches of a dataset in memory, in :class:`GlobalBatches` order."""

    def __init__(self, dataset: Any, batches: GlobalBatches, collate: Callable[[List[Dict[str, Any]]], Dict[str, Any]]) -> None:
        self.dataset, self.batches, self.collate = dataset, batches, collate
        self.epoch = self.micro = 0

    def seek(self, epoch: int, micro: int) -> None:
        self.epoch, self.micro = epoch, micro

    def next(self) -> Tuple[Dict[str, Any], int, int]:
        if self.micro >= self.batches.per_epoch:
            self.epoch, self.micro = self.epoch + 1, 0
        rows = fetch_rows(self.dataset, self.batches.indices(self.epoch, self.micro))
        self.micro += 1
        return self.collate(rows), self.epoch, self.micro


class StreamSource(MicroBatchSource):
    """Epochs of a :class:`BatchStream`; resuming mid-epoch skips the micro-batches already used."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream
        self.epoch = self.micro = 0
        self._it: Optional[Iterator[Dict[str, torch.Tensor]]] = None

    def seek(self, epoch: int, micro: int) -> None:
        self.epoch, self.micro = epoch, 0
        self._it = iter(self.stream.iter_epoch(epoch))
        for _ in range(micro):
            self._advance()

    def _advance(self) -> Dict[str, torch.Tensor]:
        for _attempt in range(2):
            if self._it is None:
                self._it = iter(self.stream.iter_epoch(self.epoch))
            try:
                batch = next(self._it)
                self.micro += 1
                return batch
            except StopIteration:
                if self.micro == 0:
                    raise InputError("the training data stream yielded no batches") from None
                self.epoch, self.micro, self._it = self.epoch + 1, 0, None
        raise InputError("the training data stream yielded no batches")

    def next(self) -> Tuple[Dict[str, Any], int, int]:
        batch = self._advance()
        return batch, self.epoch, self.micro
