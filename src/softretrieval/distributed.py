"""A catalog sharded over Dask workers: :class:`ShardedIndex`.

Needs Dask distributed (``pip install "softretrieval[distributed]"``); it is
imported only with this module.

How it runs. Each shard (an index folder of a sharded folder written by
:meth:`softretrieval.Index.save_shards`) is loaded by one task on a worker,
memory-mapped, and stays there as a persisted future that this object
holds (the scheduler spreads the loads over the workers as it does any
independent tasks; they carry no worker restriction, which could outlive
the workers it names): a call sends the query batch to every shard's worker, each worker
runs the ordinary kernels over its shard
(:func:`softretrieval.merging.shard_partial`), and only the partials come
back — ``B x k`` candidates, or ``B x dv`` outputs and ``B`` log-partitions
— to be merged here (:func:`softretrieval.merging.combine`) into exactly
what one :class:`~softretrieval.Index` over all the items returns.

Why futures rather than actors. A loaded shard is the result of a task
whose inputs (the folder and the manifest) the scheduler keeps, so when a
worker dies Dask recomputes it — reloads the shard from its folder — on
another worker and reruns the call's tasks there: the call completes with
the same answer, with no recovery code of ours. (An actor dies with its
worker.) A loaded shard pickles as its folder's name, so if the scheduler
ever moves one, the receiving worker maps the folder again instead of
receiving the arrays; it reports its size to Dask so the scheduler keeps
the tasks beside the data. A query batch of more than
:data:`SCATTER_BYTES` is sent to the workers once, not once per shard.

A call fails rather than return a result merged from fewer shards than the
manifest lists.
"""

import os
import uuid
from typing import Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike

from . import config, interop, merging, shards, terms, validate
from .api import Exclude

try:
    import distributed
    from dask.sizeof import sizeof
except ImportError:             # pragma: no cover (the message is tested by hand)
    raise ImportError('softretrieval.distributed needs Dask distributed: '
                      'pip install "softretrieval[distributed]"') from None


#: Query batches larger than this are scattered to the workers once per call
#: (smaller ones travel inside each shard's task).
SCATTER_BYTES = 1 << 20


class _Shard:
    """A shard loaded on a worker: its :class:`softretrieval.Index`, its
    first row in the catalog, and how to load it again (a folder's
    manifest, or None for a shard that came in memory)."""

    def __init__(self, index, row_offset, manifest=None, position=None, verify=True):
        self.index = index
        self.row_offset = row_offset
        self.manifest = manifest
        self.position = position
        self.verify = verify

    def __reduce__(self):
        if self.manifest is None:
            return _Shard, (self.index, self.row_offset)
        return _load, (self.manifest, self.position, self.verify)

    def nbytes(self):
        return sum(a.nbytes for a in self.index._arrays().values())


@sizeof.register(_Shard)
def _sizeof_shard(shard):
    return shard.nbytes()


def _load(manifest, i, verify=True):
    """Task: load shard ``i`` of ``manifest`` on this worker (memory-mapped)."""
    _worker_threads()
    return _Shard(shards.load_shard(manifest, i, verify=verify), manifest.shards[i].row_offset,
                  manifest, i, verify)


def _hold(index, row_offset):
    """Task: keep an in-memory shard on this worker."""
    _worker_threads()
    return _Shard(index, row_offset)


def _worker_threads():
    """In a worker process of its own (one with a nanny), let the kernels use
    the worker's threads rather than every core of the machine."""
    try:
        worker = distributed.get_worker()
    except ValueError:
        return
    if worker.nanny is not None and config.NUM_THREADS is None:
        config.NUM_THREADS = worker.state.nthreads


def _partial(shard, method, queries, k, options):
    """Task: one shard's partial result (:func:`merging.shard_partial`)."""
    return merging.shard_partial(shard.index, shard.row_offset, method, queries, k, **options)


class ShardedIndex:
    """An index whose shards live on Dask workers, with the query methods
    of :class:`softretrieval.Index` and the same results.

    Parameters
    ----------
    source : a sharded index folder (from :meth:`Index.save_shards`), read
        by the workers (on a cluster: a path every worker sees), or an
        in-memory :class:`~softretrieval.Index` to shard (small catalogs:
        the shards travel inside the tasks, and a dead worker's shard is
        rebuilt from the copy the scheduler keeps).
    client : a ``dask.distributed.Client``.
    n_shards, sizes : for an in-memory ``source``, as in :meth:`Index.save_shards`
        (default: one shard per worker).
    verify : check every shard file's SHA-256 when a worker first loads it
        (a shard that fails is refused by name; the manifest's and the
        shards' meta.json checksums are always checked).

    Opening waits until every shard is loaded, so a missing, damaged or
    mismatched shard is refused here, with a ValueError naming it.

    Results equal those of one index over all the items: top-k ids are
    identical (ties to the earlier item in the catalog, however it was
    sharded), scores, outputs and log-partitions agree to float32
    rounding. Ids are the items' ids (row numbers for an index saved
    without ids, as in the index), ``exclude`` / ``include`` lists hold
    them, and a ``bias`` array covers the whole catalog. Calls run on the
    workers' CPUs (``device`` is not offered).

    Close it (or use ``with``) to release the workers' memory.
    """

    def __init__(self, source: Union["os.PathLike[str]", str, "object"], client, *,
                 n_shards: Optional[int] = None, sizes: Optional[ArrayLike] = None,
                 verify: bool = True) -> None:
        from .index import Index

        self._client = client
        self._futures = []
        tag = uuid.uuid4().hex[:12]
        workers = client.scheduler_info()["workers"]
        if not workers:
            raise ValueError("the Dask cluster has no workers")
        if isinstance(source, Index):
            if n_shards is None and sizes is None:
                n_shards = len(workers)
            with source._lock:
                parts, given = shards.split(source, n_shards, sizes)
                self._describe(source, given, [lo for lo, _ in parts], [len(p) for _, p in parts], None)
            tasks = [(_hold, part, lo) for lo, part in parts]
        else:
            if n_shards is not None or sizes is not None:
                raise ValueError("n_shards and sizes are for an in-memory Index; a folder's "
                                 "shards are fixed by its manifest")
            manifest = shards.read_manifest(source)
            self._describe(manifest, manifest.ids == "given", [s.row_offset for s in manifest.shards],
                           [s.ntotal for s in manifest.shards], manifest.checksum)
            tasks = [(_load, manifest, i, verify) for i in range(len(manifest.shards))]
        self._futures = [client.submit(*task, key=f"softretrieval-shard-{i}-{tag}", pure=False)
                         for i, task in enumerate(tasks)]
        try:
            distributed.wait(self._futures)
            for future in self._futures:
                future.result()          # raises the first refusal
        except BaseException:
            self.close()
            raise

    def _describe(self, source, given, offsets, counts, checksum):
        self.dim = source.dim
        #: The manifest's checksum (None for shards of an in-memory Index).
        self.checksum = checksum
        self.metric = source.metric
        self.dtype = source.dtype
        self.value_dim = source.value_dim
        self._ntotal = int(sum(counts))
        self._ids_given = given
        self._offsets = np.asarray(offsets + [self._ntotal], np.int64)

    # ------------------------------------------------------------------ contents

    @property
    def ntotal(self) -> int:
        """Number of items over all shards."""
        return self._ntotal

    def __len__(self):
        return self._ntotal

    @property
    def n_shards(self) -> int:
        """Number of shards (the manifest's, empty ones included)."""
        return len(self._offsets) - 1

    def __repr__(self):
        return (f"ShardedIndex(dim={self.dim}, metric={self.metric!r}, value_dim={self.value_dim}, "
                f"dtype={self.dtype!r}, ntotal={self.ntotal}, n_shards={self.n_shards})")

    def close(self) -> None:
        """Release the shards (the workers drop them)."""
        for future in self._futures:
            future.release()
        self._futures = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ queries

    @interop.boundary
    def search(self, queries: ArrayLike, k: int, *, exclude: Exclude = None,
               include: Exclude = None, bias=None, device: str = "cpu") -> Tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every shard, as :meth:`Index.search`."""
        k = validate.positive_int(k, "k")
        return self._call("search", queries, k, bias, device, exclude=exclude, include=include)

    @interop.boundary
    def retrieve(self, queries: ArrayLike, *, scale: Optional[float] = None,
                 temperature: Optional[float] = None, bias=None, exclude: Exclude = None,
                 include: Exclude = None, return_lse: bool = False, device: str = "cpu"):
        """Soft retrieval over every shard, as :meth:`Index.retrieve`."""
        out, lse = self._call("retrieve", queries, None, bias, device, exclude=exclude,
                              include=include, scale=scale, temperature=temperature)
        return (out, lse) if return_lse else out

    @interop.boundary
    def retrieve_topk(self, queries: ArrayLike, k: int, *, scale: Optional[float] = None,
                      temperature: Optional[float] = None, bias=None, exclude: Exclude = None,
                      include: Exclude = None, device: str = "cpu") -> terms.TopKAttention:
        """Top-k attention over every shard, as :meth:`Index.retrieve_topk`."""
        k = validate.positive_int(k, "k")
        return self._call("retrieve_topk", queries, k, bias, device, exclude=exclude,
                          include=include, scale=scale, temperature=temperature)

    @interop.boundary
    def logsumexp(self, queries: ArrayLike, *, scale: Optional[float] = None,
                  temperature: Optional[float] = None, bias=None, exclude: Exclude = None,
                  include: Exclude = None, device: str = "cpu") -> np.ndarray:
        """The full-catalog log-partition over every shard, as :meth:`Index.logsumexp`."""
        return self._call("logsumexp", queries, None, bias, device, exclude=exclude,
                          include=include, scale=scale, temperature=temperature)

    def _call(self, method, queries, k, bias, device, *, exclude, include, **options):
        """Validate here, send the batch to every shard, merge the partials."""
        if device != "cpu":
            raise ValueError(f"device must be 'cpu' for a ShardedIndex (its workers' CPUs), "
                             f"got {device!r}")
        if not self._futures:
            raise ValueError("the ShardedIndex is closed")
        if self._ntotal == 0:
            raise ValueError("the index is empty: add items before searching")
        Q = validate.float_matrix(queries, "queries")
        if Q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {Q.shape[1]} but the index has {self.dim}")
        validate.all_finite(Q, "queries")
        B = Q.shape[0]
        if k is not None:
            validate.results_fit(B, k, 12, self._ntotal)
        if method != "search":
            validate.scale_value(validate.logit_scale(options["scale"], options["temperature"]),
                                 self.dim)
        limit = None if self._ids_given else self._ntotal
        lists = {name: None if lst is None else validate.exclusion_lists(lst, B, limit, name)
                 for name, lst in (("exclude", exclude), ("include", include))}
        cut = self._bias_cuts(bias)
        batch = (self._client.scatter(Q, broadcast=True, hash=False) if Q.nbytes > SCATTER_BYTES
                 else Q)
        # gather returns every shard's partial or raises: never a merge of fewer
        parts = self._client.gather(self.submit(method, batch, k,
                                                lambda i: dict(options, bias=cut(i), **lists)))
        return merging.combine(method, parts, k, self.metric)

    def submit(self, method, queries, k=None, options=None):
        """Futures of every shard's partial (:func:`merging.shard_partial`)
        for ``method`` on ``queries``: a checked float32 (B, dim) array or
        a Dask future of one (e.g. read by a task on a worker); shard i
        gets the keyword arguments ``options(i)`` (None: none). For pipelines that merge
        on the workers (:func:`merging.combine`); the query methods do this
        and merge here."""
        if not self._futures:
            raise ValueError("the ShardedIndex is closed")
        return [self._client.submit(_partial, shard, method, queries, k,
                                    {} if options is None else options(i), pure=False)
                for i, shard in enumerate(self._futures)]

    def _bias_cuts(self, bias):
        """``i -> shard i's bias argument``: an (N,) bias cut at the shard
        boundaries; None (the stored bias) and False (none) pass through."""
        if bias is None or bias is False:
            return lambda i: bias
        b = validate.bias_vector(bias, self._ntotal)
        return lambda i: b[self._offsets[i]:self._offsets[i + 1]]
