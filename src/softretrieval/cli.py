"""The ``softretrieval`` command: build, score, validate, info, demo.

Every failure (a missing or damaged file, mismatched dimensions, a bad
option) prints one line ``softretrieval: error: ...`` and exits with status 2;
an interrupted run exits with 130 and writes nothing.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import time

import numpy as np

from . import devices, io, parquet, validate

MODES = ("soft", "topk", "topk-attention")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Fail(message)


class _Fail(Exception):
    pass


def _vectors(path, what, dataset, floats=True):
    """A (n, dim) array from a vector file; with ``floats``, integer vectors
    (``.bvecs``, integer ``.npy``) become float32."""
    arr = io.read_vectors(path, dataset)
    if arr.shape[0] == 0:
        raise _Fail(f"{path}: no {what} in the file")
    if arr.dtype.kind not in "fiu":
        raise _Fail(f"{path}: {what} must be numbers, got dtype {arr.dtype}")
    if floats and arr.dtype.kind in "iu":
        arr = arr.astype(np.float32)
    return arr


def _column(path, what, dataset=None):
    """A per-row file (ids, bias) as a 1-D array: (n,) .npy or (n, 1) vecs."""
    arr = io.read_vectors(path, dataset) if not path.endswith(".npy") else io.read_npy(path)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise _Fail(f"{path}: {what} must be one value per row, got shape {arr.shape}")
    return arr


def _is_parquet(spec):
    """Whether ``--queries`` names Parquet: a ``.parquet`` file, a folder or
    a glob pattern (an existing file of another kind is not one, whatever
    its name holds)."""
    if os.path.isfile(spec):
        return spec.lower().endswith(".parquet")
    return spec.lower().endswith(".parquet") or os.path.isdir(spec) or any(c in spec for c in "*?[")


def _queries(args):
    """``(query_ids, queries)`` from ``--queries``: for Parquet, a pyarrow
    Array of ids (``--id-column``'s, or row numbers) and the ``--column``
    embeddings; for vector files, ``None`` and the (B, d) array."""
    if not _is_parquet(args.queries):
        if args.column is not None or args.id_column is not None:
            raise _Fail(f"--queries {args.queries}: --column and --id-column are for Parquet queries")
        return None, _vectors(args.queries, "queries", "test")
    if args.column is None:
        raise _Fail(f"--queries {args.queries}: Parquet queries need --column NAME (the embedding column)")
    ids, queries = parquet.read_all(args.queries, args.column, args.id_column)
    if queries.shape[0] == 0:
        raise _Fail(f"{args.queries}: no queries in the Parquet files")
    return ids, queries


def _index_from_files(args, ids=None, bias=None):
    """An in-memory Index of ``--keys`` (and ``--values``) with the options' metric and dtype."""
    from .index import Index

    keys = _vectors(args.keys, "keys", "train")
    values = None if args.values is None else _vectors(args.values, "values", None)
    index = Index(keys.shape[1], metric=args.metric, dtype=args.dtype,
                  value_dim=None if values is None else values.shape[1])
    index.add(keys, values, ids=ids, bias=bias)
    return index


def _build(args):
    index = _index_from_files(args, ids=None if args.ids is None else _column(args.ids, "ids"),
                              bias=None if args.bias is None else _column(args.bias, "bias"))
    if args.shards is None:
        index.save(args.out)
    else:
        if args.shards < 1:
            raise _Fail("--shards must be >= 1")
        index.save_shards(args.out, args.shards)
    print(f"built {index!r}{'' if args.shards is None else f' in {args.shards} shards'} -> {args.out}")


def _is_sharded(path):
    """Whether ``path`` is a sharded index folder (its meta.json's format;
    opening it checks the rest)."""
    from . import shards

    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f).get("format") == shards.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _open_index(args, stack):
    """The index to score against: an Index (``--index`` folder, or ``--keys``
    indexed in memory) or, for a sharded folder, a ShardedIndex on the
    cluster of ``--scheduler`` / ``--workers`` (closed by ``stack``)."""
    from .index import Index

    if (args.index is None) == (args.keys is None):
        raise _Fail("give --index DIR or --keys FILE (not both)")
    cluster = args.scheduler is not None or args.workers is not None
    if args.index is None or not _is_sharded(args.index):
        if cluster:
            raise _Fail("--scheduler and --workers serve a sharded index folder (softretrieval "
                        "build --shards N)")
        return Index.load(args.index, mmap=args.mmap) if args.index is not None else _index_from_files(args)
    if not cluster:
        raise _Fail(f"--index {args.index} is a sharded index: give --workers N (a local Dask "
                    "cluster) or --scheduler ADDRESS")
    try:
        import distributed

        from .distributed import ShardedIndex
    except ImportError:
        raise _Fail('a sharded index needs Dask: pip install "softretrieval[distributed]"') from None
    if args.workers is not None:
        if args.workers < 1:
            raise _Fail("--workers must be >= 1")
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        cluster = stack.enter_context(distributed.LocalCluster(
            n_workers=args.workers, threads_per_worker=threads, processes=True,
            dashboard_address=":0", host="127.0.0.1", silence_logs=logging.CRITICAL))
        client = stack.enter_context(distributed.Client(cluster))
    else:
        client = stack.enter_context(distributed.Client(args.scheduler, timeout="30s"))
    return stack.enter_context(ShardedIndex(args.index, client))


#: The index method behind each mode of ``score``.
METHODS = {"topk": "search", "soft": "retrieve", "topk-attention": "retrieve_topk"}


def result_dict(mode, res):
    """A mode's result as ``score_batches`` returns it: a dict of (B, ...)
    arrays (topk: ``ids``, ``scores``; soft: ``out``, ``lse``;
    topk-attention: the :class:`TopKAttention` fields)."""
    if mode == "topk":
        return {"ids": res[1], "scores": res[0]}
    if mode == "soft":
        return {"out": res[0], "lse": res[1]}
    return res._asdict()


def score_batches(index, queries, mode, k, *, scale=None, temperature=None, batch_size=4096,
                  progress=True, device="cpu"):
    """Run ``mode`` over ``queries`` in batches on ``device``; returns a dict
    of (B, ...) host arrays.

    soft: ``out``, ``lse``; topk: ``ids``, ``scores``; topk-attention:
    ``out``, ``ids``, ``weights``, ``lse``, ``coverage``.
    """
    from tqdm import tqdm

    B = queries.shape[0]
    result = {}
    bar = tqdm(total=B, unit="rows", unit_scale=True, disable=not progress, file=sys.stderr,
               desc=f"score {mode}", leave=False)   # cleared at the end: errors stay one line
    try:
        for lo in range(0, B, batch_size):
            q = queries[lo:lo + batch_size]
            if mode == "soft":
                res = index.retrieve(q, scale=scale, temperature=temperature, return_lse=True,
                                     device=device)
            elif mode == "topk":
                res = index.search(q, k, device=device)
            else:
                res = index.retrieve_topk(q, k, scale=scale, temperature=temperature, device=device)
            part = result_dict(mode, res)
            for name, arr in part.items():
                if name not in result:
                    result[name] = np.empty((B,) + arr.shape[1:], arr.dtype)
                result[name][lo:lo + arr.shape[0]] = arr
            bar.update(q.shape[0])
    finally:
        bar.close()
    return result


def _recall(ids, gt, k):
    """Mean recall@k of (B, >=k) ids against (B, >=k) ground-truth ids."""
    k = min(k, ids.shape[1], gt.shape[1])
    return float(np.mean([np.intersect1d(a[:k], b[:k]).size / k for a, b in zip(ids, gt)]))


def _score(args):
    with contextlib.ExitStack() as stack:
        index = _open_index(args, stack)
        if (args.scheduler is not None or args.workers is not None) and _is_parquet(args.queries) \
                and not os.path.splitext(args.out)[1]:
            return _score_partitions(args, index)
        _score_with(args, index)


def _score_with(args, index):
    """``score`` in this process (an Index, or a ShardedIndex called batch
    by batch): the queries read here, one output file."""
    from .index import Index

    query_ids, queries = _queries(args)
    if queries.shape[1] != index.dim:
        raise _Fail(f"queries have dimension {queries.shape[1]} but the index has {index.dim}")
    if args.k < 1 or args.batch_size < 1:
        raise _Fail("-k and --batch-size must be >= 1")
    validate.results_fit(queries.shape[0], args.k, 12, len(index))
    # everything that can be refused is refused before the first batch
    validate.all_finite(validate.float_matrix(queries, f"queries ({args.queries})"),
                        f"queries ({args.queries})")
    if args.mode != "topk":
        validate.scale_value(validate.logit_scale(args.scale, args.temperature), index.dim)
    if not isinstance(index, Index) and args.device != "cpu":
        raise _Fail(f"--device {args.device}: a sharded index runs on its workers' CPUs")
    devices.kernels(args.device)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise _Fail(f"--out {args.out}: the folder {folder} does not exist")
    ext = os.path.splitext(args.out)[1].lower()
    primary = {"soft": {".npy": "out", ".fvecs": "out", ".npz": None, ".parquet": None},
               "topk": {".npy": "ids", ".ivecs": "ids", ".fvecs": "scores", ".npz": None, ".parquet": None},
               "topk-attention": {".npy": "out", ".fvecs": "out", ".ivecs": "ids", ".npz": None,
                                  ".parquet": None}}
    if ext not in primary[args.mode]:
        raise _Fail(f"--out {args.out}: mode {args.mode} writes {sorted(primary[args.mode])}")
    name = primary[args.mode][ext]
    if (name == "ids" and ext == ".ivecs" and isinstance(index, Index) and index.ids is not None
            and index.ids.max() > io.INT32_MAX):
        raise _Fail(f"--out {args.out}: the index has ids up to {index.ids.max()}, beyond the "
                    "32-bit .ivecs format: write .npy or .npz")
    if ext == ".parquet":
        parquet.require_pyarrow()
    gt = None
    if args.groundtruth is not None and args.mode != "soft":
        gt = _vectors(args.groundtruth, "ground truth", "neighbors", floats=False)
        if gt.shape[0] != queries.shape[0]:
            raise _Fail(f"{args.groundtruth}: {gt.shape[0]} rows for {queries.shape[0]} queries")
    start = time.perf_counter()
    result = score_batches(index, queries, args.mode, args.k, scale=args.scale,
                           temperature=args.temperature, batch_size=args.batch_size,
                           progress=not args.quiet, device=args.device)
    took = time.perf_counter() - start
    if ext == ".parquet":
        parquet.write_results(args.out, args.mode, result,
                              np.arange(queries.shape[0]) if query_ids is None else query_ids)
    else:
        if ext == ".npz" and args.id_column is not None:
            ids = query_ids.to_numpy(zero_copy_only=False)
            if ids.dtype.kind in "iuf":     # other ids (strings) have no place in an .npz
                result["query_ids"] = ids
        io.write_output(args.out, result if name is None else {name: result[name]})
    print(f"scored {queries.shape[0]} queries x {len(index)} items ({args.mode}) in {took:.2f} s "
          f"({queries.shape[0] / took:,.0f} rows/s) -> {args.out}")
    if gt is not None:
        print(f"recall@{args.k} against {args.groundtruth}: {_recall(result['ids'], gt, args.k):.4f}")


def _score_partitions(args, sharded):
    """Parquet queries over a cluster: each query file is a partition, read,
    scored against every shard (in batches of ``--batch-size``) and merged
    by tasks on the workers, and written as ``--out/<file>.parquet``
    (atomically). ``--out/run.json`` records the run; a rerun with the same
    settings skips the partitions already written, one with others is
    refused."""
    from distributed import as_completed
    from tqdm import tqdm

    if args.column is None:
        raise _Fail(f"--queries {args.queries}: Parquet queries need --column NAME (the embedding column)")
    if args.groundtruth is not None:
        raise _Fail("--groundtruth needs one output file: give --out FILE.parquet (or .npz)")
    if args.k < 1 or args.batch_size < 1:
        raise _Fail("-k and --batch-size must be >= 1")
    if args.device != "cpu":
        raise _Fail(f"--device {args.device}: a sharded index runs on its workers' CPUs")
    out = os.path.abspath(args.out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise _Fail(f"--out {args.out}: partitioned results go to a folder, and this is a file")
    if not os.path.isdir(os.path.dirname(out)):
        raise _Fail(f"--out {args.out}: the folder {os.path.dirname(out)} does not exist")
    options = {}
    if args.mode != "topk":
        validate.scale_value(validate.logit_scale(args.scale, args.temperature), sharded.dim)
        options = {"scale": args.scale, "temperature": args.temperature}
    files = [os.path.abspath(f) for f in parquet.query_files(args.queries)]
    counts = [parquet.num_rows(f) for f in files]
    root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    names = [os.path.splitext(os.path.relpath(f, root))[0].replace(os.sep, "__") + ".parquet"
             for f in files]
    _record_run(args, out, sharded, names, counts)
    method, k = METHODS[args.mode], None if args.mode == "soft" else args.k
    client = sharded._client
    jobs = {}
    start = 0
    for path, name, count in zip(files, names, counts):
        target = os.path.join(out, name)
        if count and not os.path.exists(target):
            part = client.submit(_read_partition, path, args.column, args.id_column, start,
                                 sharded.dim, pure=False)
            partials = []
            for lo in range(0, count, args.batch_size):
                queries = client.submit(_rows, part, lo, lo + args.batch_size, pure=False)
                partials.append(sharded.submit(method, queries, k, lambda i: options))
            jobs[client.submit(_write_partition, part, target, args.mode, k, sharded.metric, partials,
                               pure=False)] = count
        start += count
    rows = sum(jobs.values())
    began = time.perf_counter()
    bar = tqdm(total=rows, unit="rows", unit_scale=True, disable=args.quiet, file=sys.stderr,
               desc=f"score {args.mode}", leave=False)
    try:
        for job in as_completed(jobs):
            job.result()
            bar.update(jobs[job])
    finally:
        bar.close()
    took = time.perf_counter() - began
    skipped = sum(c > 0 for c in counts) - len(jobs)
    print(f"scored {rows} queries in {len(jobs)} partitions x {len(sharded)} items on "
          f"{sharded.n_shards} shards ({args.mode}) in {took:.2f} s"
          f"{f' ({skipped} partitions already written)' if skipped else ''} -> {args.out}")


def _record_run(args, out, sharded, names, counts):
    """Create ``out`` and its ``run.json`` (what the partitions in it were
    scored with), or check that an earlier run's matches: a rerun may only
    add partitions (new query files, when ids come from ``--id-column``)."""
    run = {"index": sharded.checksum, "mode": args.mode, "k": None if args.mode == "soft" else args.k,
           "scale": args.scale, "temperature": args.temperature, "column": args.column,
           "id_column": args.id_column,
           "files": None if args.id_column is not None else dict(zip(names, counts))}
    file = os.path.join(out, "run.json")
    if os.path.exists(file):
        try:
            with open(file) as f:
                before = json.load(f)
        except (OSError, ValueError) as exc:
            raise _Fail(f"--out {args.out}: run.json cannot be read ({exc})") from None
        if before != run:
            differ = sorted(key for key in run if before.get(key) != run[key])
            raise _Fail(f"--out {args.out} holds partitions of another run (its {', '.join(differ)} "
                        "differ; row-number ids need the same query files): give a new folder")
        return
    os.makedirs(out, exist_ok=True)
    io.write_aside(file, lambda f: f.write(json.dumps(run, indent=2).encode()))


def _read_partition(path, column, id_column, id_start, dim):
    """Task: one query file's ``(ids, Q)``, checked."""
    ids, Q = parquet.read_queries(path, column, id_column, id_start)
    if Q.shape[1] != dim:
        raise ValueError(f"{path}: column {column!r} has dimension {Q.shape[1]} but the index has {dim}")
    validate.all_finite(Q, f"queries ({path}, column {column!r})")
    return ids, Q


def _rows(part, lo, hi):
    """Task: rows ``lo:hi`` of a partition's queries (one batch)."""
    return part[1][lo:hi]


def _write_partition(part, path, mode, k, metric, batches):
    """Task: merge each batch's shard partials and write the partition's results."""
    from . import merging

    results = [result_dict(mode, merging.combine(METHODS[mode], partials, k, metric))
               for partials in batches]
    parquet.write_results(path, mode, {name: np.concatenate([r[name] for r in results])
                                       for name in results[0]}, part[0])


def _validate(args):
    import faiss

    from .index import Index

    base = _vectors(args.base, "base vectors", "train").astype(np.float32)
    queries = _vectors(args.queries, "queries", "test").astype(np.float32)
    if queries.shape[1] != base.shape[1]:
        raise _Fail(f"queries have dimension {queries.shape[1]} but the base has {base.shape[1]}")
    index = Index(base.shape[1], metric=args.metric)
    index.add(base)
    scores, ids = index.search(queries, args.k)
    flat = (faiss.IndexFlatL2 if args.metric == "l2" else faiss.IndexFlatIP)(base.shape[1])
    flat.add(base)
    fs, fi = flat.search(queries, args.k)
    print(f"recall@{args.k} against FAISS {type(flat).__name__}: {_recall(ids, fi, args.k):.4f}; "
          f"max |score difference|: {np.abs(scores - fs).max():.3g}")
    if args.groundtruth is not None:
        gt = _vectors(args.groundtruth, "ground truth", "neighbors", floats=False)
        print(f"recall@{args.k} against {args.groundtruth}: {_recall(ids, gt, args.k):.4f} "
              f"(FAISS: {_recall(fi, gt, args.k):.4f})")


def _info(args):
    if _is_sharded(args.index):
        return _info_shards(args)
    from .index import FORMAT, FORMAT_VERSION, LEGACY_VERSIONS
    from .persist import load_folder

    meta, arrays = load_folder(args.index, FORMAT, FORMAT_VERSION, mmap=True, verify=not args.fast,
                               legacy=LEGACY_VERSIONS)
    size = sum(os.path.getsize(os.path.join(args.index, info.get("file", f"{n}.npy")))
               for n, info in meta["files"].items())
    fields = {k: v for k, v in meta.items() if k not in ("files", "checksum")}
    fields["files"] = {n: f"{a.dtype} {list(a.shape)}" for n, a in arrays.items()}
    fields["bytes"] = size
    fields["checksums"] = "skipped" if args.fast else "ok"
    print(json.dumps(fields, indent=2))


def _info_shards(args):
    """``info`` of a sharded folder: the manifest, each shard checked
    against it (and its files' checksums unless ``--fast``)."""
    from . import shards

    manifest = shards.read_manifest(args.index)
    rows = []
    for i, shard in enumerate(manifest.shards):
        shards.load_shard(manifest, i, verify=not args.fast)
        rows.append({"name": shard.name, "folder": os.path.basename(shard.path), "ntotal": shard.ntotal,
                     "row_offset": shard.row_offset, "id_min": shard.id_min, "id_max": shard.id_max,
                     "bytes": sum(os.path.getsize(os.path.join(shard.path, f))
                                  for f in os.listdir(shard.path))})
    fields = {k: v for k, v in manifest._asdict().items() if k not in ("path", "shards")}
    fields.update(format=shards.FORMAT, shards=rows, checksums="skipped" if args.fast else "ok")
    print(json.dumps(fields, indent=2))


def _demo(args):
    from . import datasets

    paths = datasets.minilm_paths(args.root, root_name="--root")
    out = args.out
    os.makedirs(out, exist_ok=True)
    common = ["--keys", paths["base"], "--queries", paths["query"], "-k", "10"]
    main(["score", *common, "--mode", "topk", "--groundtruth", paths["groundtruth"],
          "--out", os.path.join(out, "minilm_top10.npz"), *(["--quiet"] if args.quiet else [])])
    main(["score", *common, "--mode", "soft", "--temperature", "0.05",
          "--out", os.path.join(out, "minilm_soft.npz"), *(["--quiet"] if args.quiet else [])])


def parser():
    p = _Parser(prog="softretrieval", description="Streaming softmax retrieval over item catalogs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("build", help="build an index folder from vector files")
    b.add_argument("--keys", required=True, help=".npy, .fvecs, .bvecs or FILE.hdf5[:train]")
    b.add_argument("--values", help="(n, dv) values, same formats")
    b.add_argument("--ids", help="(n,) int64 .npy or (n, 1) .ivecs external ids")
    b.add_argument("--bias", help="(n,) .npy or (n, 1) .fvecs per-item bias")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "int8"])
    b.add_argument("--metric", default="ip", choices=["ip", "cosine", "l2"])
    b.add_argument("--shards", type=int,
                   help="write a sharded index of this many shards (for softretrieval score "
                        "--workers / --scheduler)")
    b.add_argument("--out", required=True, help="index folder to write")
    b.set_defaults(run=_build)

    s = sub.add_parser("score", help="score queries against an index or a key file")
    s.add_argument("--index", help="index folder (from build; a sharded one with --workers or "
                                   "--scheduler)")
    s.add_argument("--keys", help="or a key file, indexed in memory")
    s.add_argument("--values", help="values for --keys")
    s.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "int8"],
                   help="storage for --keys")
    s.add_argument("--metric", default="ip", choices=["ip", "cosine", "l2"], help="for --keys")
    s.add_argument("--mmap", action="store_true", help="memory-map the index")
    s.add_argument("--queries", required=True,
                   help=".npy, .fvecs, .bvecs or FILE.hdf5[:test]; or Parquet: a .parquet file, a folder "
                        "of them or a glob pattern (with --column)")
    s.add_argument("--column", help="Parquet queries: the embedding column (a list of floats per row)")
    s.add_argument("--id-column", help="Parquet queries: a column of query ids, written to the results "
                                       "(default: row numbers)")
    s.add_argument("--mode", required=True, choices=MODES)
    s.add_argument("-k", type=int, default=10)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--scale", type=float)
    g.add_argument("--temperature", type=float)
    s.add_argument("--batch-size", type=int, default=4096)
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where the kernels run (cuda: the index is copied to the GPU once)")
    s.add_argument("--groundtruth",
                   help="ground-truth ids (.ivecs, .npy, FILE.hdf5[:neighbors]): print recall")
    s.add_argument("--out", required=True,
                   help=".npz (every array) or .npy/.fvecs/.ivecs (soft: out; topk: ids, "
                        ".fvecs scores; topk-attention: out, .ivecs ids), or .parquet (a table "
                        "with query ids: see the guide); with Parquet queries on a cluster, a "
                        "folder of one .parquet file per query file")
    c = s.add_mutually_exclusive_group()
    c.add_argument("--scheduler", metavar="ADDRESS",
                   help="a sharded --index served by the Dask cluster at ADDRESS")
    c.add_argument("--workers", type=int, metavar="N",
                   help="a sharded --index served by a local Dask cluster of N worker processes")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(run=_score)

    v = sub.add_parser("validate", help="recall and score agreement against FAISS")
    v.add_argument("--base", required=True)
    v.add_argument("--queries", required=True)
    v.add_argument("--groundtruth")
    v.add_argument("-k", type=int, default=10)
    v.add_argument("--metric", default="ip", choices=["ip", "l2"])
    v.set_defaults(run=_validate)

    i = sub.add_parser("info", help="describe an index folder (and verify its checksums)")
    i.add_argument("index")
    i.add_argument("--fast", action="store_true", help="skip the checksums")
    i.set_defaults(run=_info)

    d = sub.add_parser("demo", help="score the shipped MiniLM queries: top-10 with recall, and soft")
    d.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    d.add_argument("--root", help="a folder holding minilm-pystdlib-384d/ (default: the copy "
                                  "shipped in the package)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(run=_demo)
    return p


def main(argv=None):
    """Entry point of the ``softretrieval`` console script."""
    try:
        args = parser().parse_args(argv)
        args.run(args)
    except (_Fail, ValueError, TypeError, OSError) as exc:
        print(f"softretrieval: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("softretrieval: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
