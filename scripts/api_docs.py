"""Write docs/reference.md from the docstrings of the public API.

    python scripts/api_docs.py            # rewrite docs/reference.md
    python scripts/api_docs.py --check    # exit 1 if it is out of date

The docstrings are the one place the API is described; this page is made
from them (tests/test_readme.py checks it is current), so it cannot drift.
"""

import argparse
import inspect
import os
import sys

import softretrieval as sr
from softretrieval import datasets, io, parquet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "reference.md")

HEADER = """# API reference

Generated from the docstrings by `python scripts/api_docs.py` (the tests check that it is current):
edit the docstrings, not this page. Worked examples and behaviour at the edges: [guide.md](guide.md).
"""


def _entry(name, obj, level="##"):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = ""
    else:     # without annotations: they render differently across numpy versions
        sig = str(sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                          for p in sig.parameters.values()],
                              return_annotation=inspect.Signature.empty))
    doc = inspect.getdoc(obj) or "(no docstring)"
    return f"{level} `{name}{sig}`\n\n```text\n{doc}\n```\n"


def render():
    parts = [HEADER]
    parts.append("## Functions\n")
    for name in ("attention", "logsumexp", "topk", "topk_attention", "merge", "merge_topk",
                 "memory_attention",
                 "attention_backward", "logsumexp_backward", "topk_attention_backward",
                 "memory_attention_backward", "AttentionGrads", "MemoryGrads"):
        parts.append(_entry(f"softretrieval.{name}", getattr(sr, name), "###"))
    from softretrieval.distributed import ShardedIndex

    for cls in (sr.Index, sr.KNNMemory, ShardedIndex):
        module = "distributed." if cls is ShardedIndex else ""
        parts.append(f"## `softretrieval.{module}{cls.__name__}`\n")
        parts.append(_entry(cls.__name__, cls, "###"))
        for name, member in inspect.getmembers(cls):
            if name.startswith("_"):
                continue
            if isinstance(inspect.getattr_static(cls, name), property):
                parts.append(f"### `{cls.__name__}.{name}` (property)\n\n```text\n"
                             f"{inspect.getdoc(member) or ''}\n```\n")
            elif callable(member):
                parts.append(_entry(f"{cls.__name__}.{name}", member, "###"))
    parts.append("## `softretrieval.torch` (needs torch)\n")
    import softretrieval.torch as st

    parts.append(f"```text\n{inspect.getdoc(st)}\n```\n")
    for name in st.__all__:
        parts.append(_entry(f"softretrieval.torch.{name}", getattr(st, name), "###"))
    parts.append("## Result types\n")
    for cls in (sr.TopKAttention, sr.MemoryRead):
        parts.append(f"### `softretrieval.{cls.__name__}`\n\n```text\n{inspect.getdoc(cls)}\n```\n")
    parts.append("## Data and files\n")
    for module, names in ((datasets, ("load_minilm", "minilm_paths", "clustered", "catalog")),
                          (io, ("read_vectors", "write_output")),
                          (parquet, ("query_files", "read_queries", "read_all", "write_results"))):
        for name in names:
            parts.append(_entry(f"softretrieval.{module.__name__.rsplit('.', 1)[1]}.{name}",
                                getattr(module, name), "###"))
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is stale")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        with open(PAGE, encoding="utf-8") as f:
            if f.read() != text:
                print("docs/reference.md is out of date: run python scripts/api_docs.py")
                return 1
        return 0
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
