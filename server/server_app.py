"""The ServerApp: reads the run config, composes the model config and runs the phase schedule."""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from histodiff.config import compose
    from strategies.federation import Federation
    from strategies.settings import Settings

    settings = Settings.from_run_config(context.run_config)
    cfg = compose(settings.config_overrides())
    log(INFO, "[fed] run dir %s, strategy %s, transfer %s, min-sites %d", settings.run_dir, settings.strategy,
        settings.transfer_dtype, settings.min_sites)
    state = Federation(grid, settings, cfg, emit=lambda line: log(INFO, line)).run()
    log(INFO, "[fed] status %s %s", state.status, state.message)
