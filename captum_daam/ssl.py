"""Self-supervised DAAM: a memory bank of labelled features, weighted k-NN, and the
dimension-wise importance weights that stand in for a classifier's gradients.

The k-NN classifier is the one of DINO's evaluation (Caron et al. 2021): cosine similarity to
the bank, the k most similar entries, each voting exp(similarity / T) for its label. The
importance weights follow the DAAM paper (Liao, Gao & Zhang 2025): over the k neighbours that
carry the predicted label, the mean of (normalised query ⊙ normalised neighbour), a per-dimension
contribution to the similarity, min-max scaled to [0, 1] per example.
"""

import math
import numbers
import os
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

__all__ = ["MemoryBank"]

DEFAULT_MEMORY_BUDGET = 256 * 2**20
BANK_FILE_FORMAT = "captum-daam-memory-bank-1"
# rows within this many machine epsilons of unit norm count as normalised on load
UNIT_NORM_EPSILONS = 128


class MemoryBank:
    r"""
    Labelled features of a training set, kept L2-normalised, for weighted k-NN.

    Similarities are computed one chunk of the bank at a time, so that a query batch never
    holds a (B, chunk) similarity block larger than ``memory_budget`` bytes, whatever the
    size of the bank (ImageNet's 1.28 M training features included). Each block is reduced
    to its k best entries at once (``topk``), and merged with the running best k; the
    working memory of a call is about three times the budget (measured in
    ``benchmarks/knn.py``).

    Ties are resolved deterministically: between equally similar entries the earlier one in
    the bank is the nearer neighbour, and between classes with equal votes the smaller label
    wins. Votes are computed relative to the nearest neighbour's, exp((similarity -
    largest similarity) / T): the classes are ordered as by exp(similarity / T), but nothing
    overflows, however small T. The votes are summed and compared in the bank's precision
    (float32 or float64): a vote below that precision next to the nearest neighbour's vote
    of 1 changes nothing (as T goes to 0 the vote becomes 1-NN), and classes whose votes are
    then equal are tied.

    Examples::

        >>> import torch
        >>> from captum_daam import MemoryBank
        >>> bank = MemoryBank(torch.randn(100, 8), torch.arange(100) % 4)
        >>> queries = torch.randn(3, 8)
        >>> bank.classify(queries, k=5).shape
        torch.Size([3])
        >>> weights, predicted = bank.importance(queries, k=5)
        >>> weights.shape, bool(((weights >= 0) & (weights <= 1)).all())
        (torch.Size([3, 8]), True)
    """

    def __init__(
        self, features: Tensor, labels: Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET
    ) -> None:
        r"""
        Args:
            features (Tensor): (M, D) real (floating-point or integer) features of the
                        bank's examples, at any scale; they are stored L2-normalised, as
                        float32 (or float64 if given so). A row of zeros stays zeros
                        (similarity 0 to every query).
            labels (Tensor): (M,) integer class labels, 0 or more. Negative labels are
                        refused: a data set's -1 (or ``ignore_index`` -100) means "no
                        label", and such entries would vote as a class; leave those
                        examples out of the bank.
            memory_budget (int, optional): Bytes that one block of query-to-bank
                        similarities may take. Default: 256 MiB.
        """
        if not isinstance(features, Tensor):
            raise ValueError(f"Expected features shaped (M, D), got {_describe(features)}.")
        if not isinstance(labels, Tensor):
            raise ValueError(f"Expected labels as a 1-D integer tensor, got {_describe(labels)}.")
        _check_bank_shapes(tuple(features.shape), tuple(labels.shape))
        if features.is_complex() or features.dtype == torch.bool:
            raise ValueError(
                f"Expected real features (floating point or integer), got dtype {features.dtype}."
            )
        if not _is_integer(labels):
            raise ValueError(f"Expected integer labels, got dtype {labels.dtype}.")
        _check_non_negative(labels)
        if not features.is_floating_point():
            features = features.float()
        if not bool(torch.isfinite(features).all()):
            raise ValueError("Expected finite features, got NaN or infinite values.")
        if memory_budget < 1:
            raise ValueError(f"Expected a positive memory_budget in bytes, got {memory_budget}.")
        dtype = torch.promote_types(features.dtype, torch.float32)
        self.features = F.normalize(features.detach().to(dtype), dim=1)
        self.labels = labels.detach().to(device=features.device, dtype=torch.long)
        self.memory_budget = int(memory_budget)
        # the sorted distinct labels, and each entry's position among them (for the votes)
        self.classes, self.class_of_entry = torch.unique(self.labels, return_inverse=True)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """Feature width D."""
        return self.features.shape[1]

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: Union[str, torch.device]) -> "MemoryBank":
        """A copy of the bank on ``device``."""
        return self._from_normalised(
            self.features.to(device), self.labels.to(device), self.memory_budget
        )

    @classmethod
    def _from_normalised(cls, features: Tensor, labels: Tensor, memory_budget: int) -> "MemoryBank":
        """A bank of features that are already normalised, kept bit for bit."""
        bank = cls(features, labels, memory_budget)  # all the checks
        bank.features = features
        return bank

    # ------------------------------------------------------------------ queries

    def neighbours(self, features: Tensor, k: int = 20) -> Tuple[Tensor, Tensor]:
        """The k most similar bank entries of each query.

        Args:
            features: (B, D) queries, at any scale.
            k: neighbours per query; values above the bank size are clamped to it.

        Returns:
            similarities (B, k) in descending order, and the bank indices (B, k).
        """
        queries = self._queries(features)
        k = self._clamp_k(k)
        batch = queries.shape[0]
        element_bytes = queries.element_size()
        chunk = max(1, self.memory_budget // max(1, batch * element_bytes))
        best_similarities = queries.new_empty(batch, 0)
        best_indices = torch.empty(batch, 0, dtype=torch.long, device=queries.device)
        for start in range(0, len(self), chunk):
            block = queries @ self.features[start : start + chunk].T
            similarities, positions = _top_k_of_block(block, k)
            best_similarities, best_indices = _in_order(
                torch.cat([best_similarities, similarities], dim=1),
                torch.cat([best_indices, positions + start], dim=1),
                k,
            )
        return best_similarities, best_indices

    def classify(self, features: Tensor, k: int = 20, temperature: float = 0.07) -> Tensor:
        """Weighted k-NN class of each query: votes exp(similarity / temperature) per label.

        The votes are computed relative to the nearest neighbour's (see the class docstring),
        so any positive, finite temperature is safe.

        Args:
            features: (B, D) queries, at any scale.
            k: neighbours that vote; clamped to the bank size.
            temperature: the vote temperature T, positive and finite.

        Returns:
            (B,) predicted labels, on the queries' device.
        """
        return self._vote(features, k, temperature)[0].to(features.device)

    def importance(
        self, features: Tensor, k: int = 20, temperature: float = 0.07
    ) -> Tuple[Tensor, Tensor]:
        """Dimension-wise importance weights and the k-NN prediction they explain.

        Over the k neighbours that carry the predicted label, the mean of the element-wise
        product of the normalised query and the normalised neighbour, min-max scaled to
        [0, 1] per example; all-equal contributions give weights of ones.

        Args:
            features: (B, D) queries, at any scale.
            k: neighbours; clamped to the bank size.
            temperature: the vote temperature T, positive and finite.

        Returns:
            weights (B, D) in [0, 1] and predicted labels (B,), on the queries' device.
        """
        predicted, similarities, indices = self._vote(features, k, temperature)
        queries = self._queries(features)
        neighbours = self.features[indices]  # (B, k, D)
        carries_prediction = (self.labels[indices] == predicted.unsqueeze(1)).to(queries.dtype)
        products = queries.unsqueeze(1) * neighbours
        contribution = (products * carries_prediction.unsqueeze(2)).sum(1)
        contribution = contribution / carries_prediction.sum(1, keepdim=True)
        low = contribution.amin(dim=1, keepdim=True)
        span = contribution.amax(dim=1, keepdim=True) - low
        weights = torch.where(
            span > 0, (contribution - low) / span.clamp_min(torch.finfo(span.dtype).tiny), 1.0
        )
        return weights.to(features.device), predicted.to(features.device)

    def _vote(self, features: Tensor, k: int, temperature: float) -> Tuple[Tensor, Tensor, Tensor]:
        _check_temperature(temperature)
        temperature = float(temperature)
        similarities, indices = self.neighbours(features, k)
        # exp(s / T) scaled by exp(-s_max / T): the same order of the classes, no overflow;
        # the neighbours come sorted, so column 0 holds each row's largest similarity
        gaps = similarities - similarities[:, :1]
        # the where keeps the nearest at exactly 0 when T is below the dtype's range (0 / 0)
        exponents = torch.where(gaps < 0, gaps / temperature, 0.0)
        votes = similarities.new_zeros(similarities.shape[0], self.classes.shape[0])
        votes.scatter_add_(1, self.class_of_entry[indices], exponents.exp())
        # argmax returns the first maximum: equal votes go to the smaller label.
        predicted = self.classes[votes.argmax(dim=1)]
        return predicted, similarities, indices

    def _queries(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor) or features.dim() != 2:
            raise ValueError(f"Expected query features shaped (B, D), got {_describe(features)}.")
        if features.shape[1] != self.dim:
            raise ValueError(
                f"Expected query features of width {self.dim} (the bank's), got "
                f"{features.shape[1]}."
            )
        if not bool(torch.isfinite(features).all()):
            raise ValueError("Expected finite query features, got NaN or infinite values.")
        return F.normalize(features.detach().to(self.device, self.features.dtype), dim=1)

    def _clamp_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Expected k to be an integer of at least 1, got {k!r}.")
        return min(k, len(self))

    # ------------------------------------------------------------------ files

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the bank to one safetensors file (loading it runs no pickled code)."""
        from safetensors.torch import save_file

        tensors = {"features": self.features.contiguous().cpu(), "labels": self.labels.cpu()}
        save_file(tensors, os.fspath(path), metadata={"format": BANK_FILE_FORMAT})

    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike],
        device: Union[str, torch.device] = "cpu",
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
    ) -> "MemoryBank":
        """Read a bank written by :meth:`save`, or a safetensors file laid out like one.

        The file holds exactly the tensors ``features`` (M, D) and ``labels`` (M,) and the
        metadata ``format = "captum-daam-memory-bank-1"``. The names and shapes are checked
        from the file's header before any tensor is read, then the tensors get the
        constructor's checks (real finite features, integer labels, none negative: a file
        with a data set's "no label" -1 is refused, naming the file). Features are normalised
        as the constructor normalises them, so a file of features at any scale gives the bank
        ``MemoryBank(features, labels)``. Only when every row already has unit norm (to
        within 128 machine epsilons, or is zero), as :meth:`save` writes them, and the dtype
        is one the bank keeps (float32, float64), are the features kept bit for bit, so that
        save and load round-trip exactly (normalising again would move the last bits).

        Args:
            path: the safetensors file.
            device: where the bank's tensors are loaded.
            memory_budget: as for :class:`MemoryBank`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: ``path`` is a folder, or a file that is not a safetensors file
                        (a pickle or ``torch.save`` file, text, an empty file), or a
                        safetensors file that is not a bank as described above.
        """
        from safetensors import SafetensorError, safe_open

        if os.path.isdir(path):
            raise ValueError(f"Expected a memory bank file written by MemoryBank.save, got "
                             f"{os.fspath(path)}, a folder.")
        if not os.path.exists(path):
            raise FileNotFoundError(f"No memory bank file at {os.fspath(path)}.")
        try:
            opened = safe_open(os.fspath(path), framework="pt", device=str(device))
        except SafetensorError as error:  # a header it cannot read; I/O errors stay OSError
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise ValueError(
                f"Expected a memory bank file written by MemoryBank.save (a safetensors file), "
                f"got {os.fspath(path)}, which is not a safetensors file but a pickle, text or "
                f"other data ({reason})."
            ) from None
        with opened as handle:
            file_format = (handle.metadata() or {}).get("format")
            if file_format != BANK_FILE_FORMAT:
                raise ValueError(
                    f"Expected a captum-daam memory bank file (metadata format "
                    f"{BANK_FILE_FORMAT!r}), got {os.fspath(path)} with format {file_format!r}."
                )
            names = sorted(handle.keys())
            if names != ["features", "labels"]:
                raise ValueError(
                    f"Expected exactly the tensors ['features', 'labels'] in "
                    f"{os.fspath(path)}, got {names}."
                )
            _check_bank_shapes(
                tuple(handle.get_slice("features").get_shape()),
                tuple(handle.get_slice("labels").get_shape()),
                f" in {os.fspath(path)}",
            )
            features, labels = handle.get_tensor("features"), handle.get_tensor("labels")
        if _is_integer(labels):  # float or bool labels get the constructor's message
            _check_non_negative(labels, f" in {os.fspath(path)}")
        bank = cls(features, labels, memory_budget)  # the checks, and the normalisation
        if features.dtype == bank.features.dtype and _rows_have_unit_norm(features):
            bank.features = features  # already normalised: renormalising would move ulps
        return bank

    @classmethod
    def build(
        cls,
        backbone: Union[nn.Module, Callable[[Tensor], Tensor]],
        loader: Iterable[Tuple[Tensor, Tensor]],
        device: Optional[Union[str, torch.device]] = None,
        progress: bool = True,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        distributed: Optional[bool] = None,
    ) -> "MemoryBank":
        r"""Run ``backbone`` over ``loader`` and keep its features with their labels.

        The backbone runs in eval mode without gradients; every module's train/eval mode is
        restored afterwards, also when a batch fails.

        Distributed (e.g. under ``torchrun``): each process runs the backbone over its own
        share of the loader's batches only, and every process ends with the whole bank, in the
        loader's order, equal to the bank one process builds from the same loader. The
        loader's batches are dealt out in contiguous blocks, as even as whole batches allow
        (no batch is repeated to even them out, unlike ``DistributedSampler``): each example
        goes through the backbone in the same batch as in one process, so on CPU the
        features are equal value for value. The shares' features and labels are gathered
        with ``all_gather`` (padded to the largest share, then trimmed), so every process
        holds the whole bank; a share may be empty (fewer batches than processes). If a
        process fails, the others raise too instead of waiting for it.

        ``build`` never initialises a process group: the calling script does, with
        ``torch.distributed.init_process_group`` (``gloo`` on CPU, ``nccl`` on GPUs, where
        each process must also call ``torch.cuda.set_device(local_rank)`` first, since the
        gathered tensors go through its current CUDA device under ``nccl``; the test suite
        runs on CPU and covers ``gloo`` only). Every process of the default group must call
        ``build``, with the same loader.

        Args:
            backbone (nn.Module or callable): Maps images (B, C, H, W) to features (B, D).
            loader (iterable): Yields (images, labels) batches, e.g. a torch DataLoader.
                        Labels must be 0 or more: a batch with a negative label (a data
                        set's "no label" -1, or ``ignore_index`` -100) is refused when it
                        is reached, before the rest of the loader is read (distributed:
                        by that process, while the others raise a RuntimeError naming its
                        rank, rather than wait); filter those examples out of the loader.
                        Distributed, it must be a :class:`~torch.utils.data.DataLoader`
                        over a map-style dataset in its own order (``shuffle=False``, the
                        default, and no custom sampler), so that each process loads only
                        its own batches; its workers, collate function, pinning and
                        ``drop_last`` are kept.
            device (str or torch.device, optional): Where the backbone runs.
                        Default: where its parameters are.
            progress (bool, optional): Show a tqdm progress bar (distributed: on rank 0
                        only, for its share). Default: True.
            memory_budget (int, optional): As for :class:`MemoryBank`.
                        Default: 256 MiB.
            distributed (bool, optional): Share the work among the processes of the
                        default process group. None (the default) does so when a group
                        is initialised and has more than one process; True requires an
                        initialised group; False builds from this process's loader
                        alone, as each process did before (e.g. a loader that is already
                        sharded, with ``DistributedSampler``). Default: None.

        Returns:
            MemoryBank: the features (normalised) and labels of every example the loader
            yields, in its order, on the device of the backbone's features.

        Example, a script ``build_bank.py`` run as ``torchrun --nproc_per_node=2
        build_bank.py`` (``train_set`` and ``backbone`` being the user's)::

            import torch.distributed as dist
            from torch.utils.data import DataLoader

            dist.init_process_group("gloo")
            loader = DataLoader(train_set, batch_size=64, num_workers=4)
            bank = MemoryBank.build(backbone, loader, progress=False)
            if dist.get_rank() == 0:
                bank.save("bank.safetensors")
            dist.destroy_process_group()
        """
        from tqdm.auto import tqdm

        shared = _use_distributed(distributed)
        rank = dist.get_rank() if shared else 0
        if shared:
            loader = _share_of_loader(loader, rank, dist.get_world_size())
        modules = list(backbone.modules()) if isinstance(backbone, nn.Module) else []
        modes = [module.training for module in modules]
        if device is None:
            parameter = next(iter(backbone.parameters()), None) if modules else None
            device = parameter.device if parameter is not None else torch.device("cpu")
        features, labels = [], []
        failure = None
        try:
            if modules:
                backbone.eval()
            with torch.no_grad():
                batches = tqdm(loader, desc="memory bank", disable=not progress or rank != 0)
                for images, batch_labels in batches:
                    output = backbone(images.to(device))
                    if not isinstance(output, Tensor) or output.dim() != 2:
                        raise ValueError(
                            f"Expected the backbone to return features shaped (B, D), got "
                            f"{_describe(output)}."
                        )
                    batch_labels = torch.as_tensor(batch_labels)
                    if _is_integer(batch_labels):
                        _check_non_negative(batch_labels)  # before the rest of the loader
                    features.append(output.float())
                    labels.append(batch_labels.to(output.device))
        except Exception as error:
            if not shared:
                raise
            failure = error  # raised after telling the other processes, which would wait
        finally:
            for module, mode in zip(modules, modes):
                module.training = mode
        if shared:
            features, labels = _gather_shares(features, labels, failure, torch.device(device))
        elif not features:
            raise ValueError("Expected the loader to yield at least one batch, got none.")
        else:
            features, labels = torch.cat(features), torch.cat(labels)
        return cls(features, labels, memory_budget)


def _check_non_negative(labels: Tensor, where: str = " in the memory bank") -> None:
    negative = labels[labels < 0]
    if negative.numel():
        values = sorted(set(negative.tolist()))
        shown = ", ".join(str(value) for value in values[:5]) + (", ..." if len(values) > 5 else "")
        entries = "1 entry" if negative.numel() == 1 else f"{negative.numel()} entries"
        raise ValueError(
            f"Expected non-negative labels{where}, got [{shown}] ({entries}): a data set's "
            f"negative label (-1, or ignore_index -100) means \"no label\", and those entries "
            f"would vote as a class. Leave those examples out of the bank."
        )


def _use_distributed(distributed: Optional[bool]) -> bool:
    """Whether :meth:`MemoryBank.build` shares the work among the default group's processes."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"Expected distributed to be None, True or False, got {distributed!r}.")
    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise ValueError(
            "Expected an initialised default process group for distributed=True, got none: "
            "call torch.distributed.init_process_group() first (e.g. under torchrun), or "
            "pass distributed=False."
        )
    if distributed is None:
        return initialised and dist.get_world_size() > 1
    return distributed


def _share_of_loader(loader: Iterable, rank: int, world_size: int) -> DataLoader:
    """A DataLoader over this rank's contiguous block of ``loader``'s batches, the same
    batches (indices) as ``loader`` yields them, with its workers and collate function."""
    given = _unshareable(loader)
    if given is not None:
        raise ValueError(
            f"Expected a torch DataLoader over a map-style dataset in its own order "
            f"(shuffle=False, no custom sampler) to share among processes, got {given}. "
            f"Pass such a loader, or distributed=False for each process to build a bank from "
            f"its own loader."
        )
    # automatic batching off (batch_size=None): each index of the sampler is a batch already
    batched = loader.batch_sampler is not None
    units = list(loader.batch_sampler if batched else loader.sampler)
    start, stop = _block_bounds(len(units), rank, world_size)
    options = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if batched:
        return DataLoader(loader.dataset, batch_sampler=units[start:stop], **options)
    return DataLoader(loader.dataset, batch_size=None, sampler=units[start:stop], **options)


def _unshareable(loader: Iterable) -> Optional[str]:
    """What keeps ``loader`` from being shared among processes in its own order, or None."""
    if not isinstance(loader, DataLoader):
        return _describe(loader)
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return f"a DataLoader with a custom batch sampler ({type(batch_sampler).__name__})"
    order = loader.sampler if batch_sampler is None else batch_sampler.sampler
    if not isinstance(order, SequentialSampler):
        return f"a DataLoader with a {type(order).__name__} (e.g. shuffle=True)"
    return None


def _block_bounds(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[start, stop) of rank's block when ``count`` items are dealt out in contiguous blocks,
    rank 0's first, the first ``count % world_size`` blocks one item longer."""
    base, longer = divmod(count, world_size)
    start = rank * base + min(rank, longer)
    return start, start + base + (1 if rank < longer else 0)


def _gather_shares(
    features: List[Tensor],
    labels: List[Tensor],
    failure: Optional[Exception],
    bank_device: torch.device,
) -> Tuple[Tensor, Tensor]:
    """Every rank's features and labels, rank 0's first, on every rank.

    Sizes go first (rows, width, whether the rank failed), so that a failure is raised on
    every rank rather than leaving the others waiting in the next collective, and so that
    each share can be padded to the largest for ``all_gather`` and trimmed afterwards.
    """
    local_features, local_labels = torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    if failure is None and features:
        try:
            local_features, local_labels = torch.cat(features), torch.cat(labels)
            if not _is_integer(local_labels) or local_labels.shape != local_features.shape[:1]:
                # refused here, not by the constructor: the gather makes them int64
                raise ValueError(
                    f"Expected labels as one integer per example, got "
                    f"{_describe(local_labels)} for features shaped "
                    f"{tuple(local_features.shape)}."
                )
        except Exception as error:
            failure = error
    # nccl moves only tensors on the rank's current CUDA device; other backends take CPU ones
    collective_device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    size = torch.tensor(
        [local_features.shape[0], local_features.shape[1], int(failure is not None)],
        dtype=torch.long,
        device=collective_device,
    )
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts, widths, failed = torch.stack(sizes).T.cpu().tolist()
    if failure is not None:
        raise failure
    if any(failed):
        raise RuntimeError(
            f"Expected every process to build its share of the memory bank, but rank(s) "
            f"{[rank for rank, flag in enumerate(failed) if flag]} failed (their error is "
            f"raised there)."
        )
    if sum(counts) == 0:
        raise ValueError("Expected the loader to yield at least one batch, got none.")
    shared_widths = sorted({width for width, count in zip(widths, counts) if count})
    if len(shared_widths) != 1:
        raise ValueError(
            f"Expected the backbone to give features of one width on every process, got "
            f"widths {shared_widths}."
        )
    if local_features.shape[0] == 0:
        local_features = torch.empty(0, shared_widths[0])
    else:
        bank_device = local_features.device  # where one process would keep the bank
    gathered_features = _gather_rows(local_features.to(collective_device), counts)
    gathered_labels = _gather_rows(local_labels.to(collective_device, torch.long), counts)
    return gathered_features.to(bank_device), gathered_labels.to(bank_device)


def _gather_rows(local: Tensor, counts: List[int]) -> Tensor:
    """All ranks' rows, rank 0's first: each share padded to the largest for ``all_gather``,
    which takes equal shapes, and trimmed back to its own count."""
    padded = local.new_zeros((max(counts),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    shares = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(shares, padded)
    return torch.cat([share[:count] for share, count in zip(shares, counts)])


def _is_integer(labels: Tensor) -> bool:
    return not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)


def _check_bank_shapes(
    features_shape: Tuple[int, ...], labels_shape: Tuple[int, ...], where: str = ""
) -> None:
    """The shape checks of a bank, shared by the constructor and :meth:`MemoryBank.load`
    (which makes them from the file's header, before reading the tensors)."""
    if len(features_shape) != 2:
        raise ValueError(f"Expected features shaped (M, D){where}, got shape {features_shape}.")
    if features_shape[0] == 0:
        raise ValueError(f"Expected a non-empty bank{where}, got 0 features.")
    if len(labels_shape) != 1:
        raise ValueError(
            f"Expected labels as a 1-D integer tensor{where}, got shape {labels_shape}."
        )
    if labels_shape[0] != features_shape[0]:
        raise ValueError(
            f"Expected one label per feature ({features_shape[0]}){where}, got "
            f"{labels_shape[0]}."
        )


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(
            f"Expected the temperature as a real number, e.g. 0.07, got {_describe(temperature)}."
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"Expected a positive, finite temperature, e.g. 0.07, got {temperature}.")


def _rows_have_unit_norm(features: Tensor) -> bool:
    """Whether every row has norm 1 to within UNIT_NORM_EPSILONS machine epsilons, or is zero,
    as the constructor's normalisation leaves them (measured: within 3 epsilons at D = 4096)."""
    norms = torch.linalg.vector_norm(features, dim=1)
    tolerance = UNIT_NORM_EPSILONS * torch.finfo(features.dtype).eps
    return bool((((norms - 1).abs() <= tolerance) | (norms == 0)).all())


def _top_k_of_block(block: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k largest entries of each row and their positions; among equal values at the
    k-th place, the earliest positions (topk alone would pick among them arbitrarily)."""
    k = min(k, block.shape[1])
    values, positions = block.topk(k, dim=1)
    threshold = values[:, -1:]
    ties_left_out = (block == threshold).sum(1) > (values == threshold).sum(1)
    if bool(ties_left_out.any()):  # rare: resolve those rows with a stable sort
        rows = ties_left_out.nonzero().squeeze(1)
        positions[rows] = block[rows].sort(dim=1, descending=True, stable=True).indices[:, :k]
        values[rows] = block[rows].gather(1, positions[rows])
    return values, positions


def _in_order(similarities: Tensor, indices: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k most similar, most similar first, equal similarities by smaller bank index."""
    by_index = indices.argsort(dim=1)
    similarities, indices = similarities.gather(1, by_index), indices.gather(1, by_index)
    order = similarities.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return similarities.gather(1, order), indices.gather(1, order)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor shaped {tuple(value.shape)} of dtype {value.dtype}"
    return f"a {type(value).__name__}"
