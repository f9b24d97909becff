"""OpenAI-compatible HTTP server (needs the `server` extra: starlette and uvicorn)."""

from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


def make_server(app, *, host: str, port: int, log_level: str = "info"):
    """A uvicorn server for `app` (from `create_app`) that, once told to exit (SIGINT,
    SIGTERM), ends the requests in flight at once (each stream gets an error event saying
    the server is shutting down) instead of waiting up to the graceful timeout for them."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.lattice.async_engine.close_streams("the server is shutting down")
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=5))


def serve(engine, *, model_name: str, settings, options=None, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        from ..errors import ConfigError
        raise ConfigError("`lattice serve` needs uvicorn and starlette: "
                          "pip install 'lattice-engine[server]'") from None
    app = create_app(engine, model_name=model_name, settings=settings, options=options)
    make_server(app, host=settings.host, port=settings.port, log_level=log_level).run()
