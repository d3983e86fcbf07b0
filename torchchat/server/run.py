"""`torchchat server` and `torchchat browser`: bind, load the model in the background, serve."""

from __future__ import annotations

import logging
import sys
import threading
import webbrowser

import torch
import uvicorn

from torchchat.builder import build_model
from torchchat.errors import TorchchatError
from torchchat.options import ModelOptions
from torchchat.server.app import create_app
from torchchat.server.config import ServerOptions

API_KEY_ENV = "TORCHCHAT_API_KEY"


def warn_if_exposed(opts: ServerOptions) -> None:
    """Say loudly when the API is reachable from other machines without a key."""
    if not opts.host_is_local() and not opts.api_key:
        bar = "!" * 78
        print(
            f"{bar}\nWARNING: serving on {opts.host}:{opts.port} with NO API key: anyone who can "
            f"reach this address can use the model.\nSet --api-key KEY (or ${API_KEY_ENV}), or "
            f"bind to 127.0.0.1.\n{bar}",
            file=sys.stderr,
        )


def serve(
    model_opts: ModelOptions,
    opts: ServerOptions,
    verbose: bool = False,
    open_browser: bool = False,
) -> None:
    """Serve until interrupted; a model that fails to load ends the server with its error."""
    warn_if_exposed(opts)
    if opts.threads is not None:
        # Small models on a busy machine run faster on one thread than waiting for a second.
        torch.set_num_threads(opts.threads)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    app = create_app(opts, lambda: build_model(model_opts, verbose=verbose))
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="info" if verbose else "warning",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    host = app.state.host
    failure: list[str] = []

    def stop(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    host.on_error = stop
    shown = "localhost" if opts.host_is_local() else opts.host
    url = f"http://{shown}:{opts.port}/"

    def announce() -> None:
        host.loaded.wait()
        if host.engine is not None:
            print(f"torchchat: serving {opts.model_id} at {url}", file=sys.stderr)
            if open_browser:
                webbrowser.open(url)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (and logs why)
        raise TorchchatError(f"could not serve on {opts.host}:{opts.port}") from None
    if failure:
        raise TorchchatError(failure[0])
    if not server.started:
        raise TorchchatError(f"could not serve on {opts.host}:{opts.port} (address in use?)")
