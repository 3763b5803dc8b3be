"""Which shared functions each target compiles, from one source.

    python scripts/shared_functions.py

Prints a table: every function of softretrieval/rules.py, core.py and
topk_buffer.py, and whether the CPU and the CUDA target compile it (the
CUDA column needs the cuda extra; without a GPU it still compiles lazily).
A function missing from a column is a rule that target would have to write
again — the drift this table makes visible (tests/test_core.py holds it).
"""

from softretrieval import core, cpu, rules, topk_buffer


def main():
    targets = {"cpu": cpu}
    try:
        from softretrieval import cuda

        targets["cuda"] = cuda
    except ImportError as exc:
        print(f"(cuda target not importable: {exc})")
    print(f"{'module':<12} {'function':<20} " + " ".join(f"{t:<5}" for t in targets))
    for label, module, attr in (("rules", rules, None), ("core", core, "core"),
                                ("topk_buffer", topk_buffer, "topk_buffer")):
        for func in module.FUNCTIONS:
            marks = []
            for target in targets.values():
                ns = target.shared if attr is None else getattr(target.shared, attr)
                marks.append("yes" if hasattr(ns, func.__name__) else "NO")
            print(f"{label:<12} {func.__name__:<20} " + " ".join(f"{m:<5}" for m in marks))


if __name__ == "__main__":
    main()
