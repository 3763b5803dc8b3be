"""``python -m softretrieval``: the ``softretrieval`` command."""

from .cli import main

main()
