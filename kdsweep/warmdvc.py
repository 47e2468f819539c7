"""``python -m kdsweep.warmdvc ARGS``: ``dvc ARGS``, forked from the sweep's warm process when it is ready.

The runner starts each trial's ``dvc exp run`` through this client while its warm process
(:mod:`kdsweep.warm`) runs: the command then runs in a process forked from one that imported
DVC already, instead of spending ~0.6 s importing it. Its output, exit status and signals are
those of ``dvc ARGS``; without a ready warm process it runs DVC in this process, as ``dvc`` would.
"""

from __future__ import annotations

import sys

from kdsweep import warm


def main() -> None:
    """Hand ``dvc`` with this process's arguments to the warm process, else run it here."""
    status = warm.delegate(warm.DVC_ENTRY)
    if status is None:
        from dvc.cli import main as dvc_main

        status = dvc_main(sys.argv[1:])
    sys.exit(status)


if __name__ == "__main__":
    main()
