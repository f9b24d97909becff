"""OpenAI-compatible HTTP server (needs the `server` extra: starlette and uvicorn)."""

from __future__ import annotations


def create_app(*args, **kwargs):
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


def serve(engine, *, model_name: str, settings, options=None, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    try:
        import uvicorn
    except ImportError:
        from ..errors import ConfigError
        raise ConfigError("`lattice serve` needs uvicorn and starlette: "
                          "pip install 'lattice-engine[server]'") from None
    app = create_app(engine, model_name=model_name, settings=settings, options=options)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level,
                timeout_graceful_shutdown=5)
