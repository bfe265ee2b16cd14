"""The ServerApp: reads the run config, composes the model config and runs the phase schedule."""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from wire import flower_transfer

flower_transfer.install()  # pushes and pulls without a second copy of the model (wire/flower_transfer.py)
flower_transfer.return_large_frees()  # freed replies go back to the system, not into a grown heap
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from strategies.federation import Federation

    federation = Federation.from_run_config(grid, context.run_config, emit=lambda line: log(INFO, line))
    s = federation.s
    log(INFO, "[fed] run dir %s, strategy %s, transfer %s, min-sites %d", s.run_dir, s.strategy, s.transfer_dtype,
        s.min_sites)
    state = federation.run()
    log(INFO, "[fed] status %s %s", state.status, state.message)
