"""What `qsweep run` (and `qsweep quantize`) show while a sweep runs, and where everything else goes.

run_sweep(sweep_file, store, verbose) -> exit code is the one entry point the CLI calls.
"""

import sys
from pathlib import Path


def run_sweep(sweep_file: Path | str, store: Path | str, verbose: bool = False) -> int:
    """Run the (already validated) sweep file on the store; 0 when every cell finished, else 1."""
    from flows.sweep import sweep

    state = sweep(sweep_file=str(sweep_file), store=str(Path(store).resolve()), return_state=True)
    print(file=sys.stdout)
    return 0 if state.is_completed() else 1
