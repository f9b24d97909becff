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

    settings = app.lattice.settings
    return Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                 timeout_graceful_shutdown=5,
                                 http=header_timeout_protocol(settings.header_timeout)))


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    `seconds` after it opened or after its previous response: uvicorn has no such timeout,
    and 60 connections sending half a header stayed open for good (each holding a socket
    and a protocol object). A connection serving a request is never closed by it."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._header_timer = None
            self._arm_header_timer()

        def _arm_header_timer(self):
            self._cancel_header_timer()
            self._waiting_after = self.cycle  # headers done = a new cycle exists
            self._header_timer = self.loop.call_later(seconds, self._header_timed_out)

        def _cancel_header_timer(self):
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waiting_after:
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _header_timed_out(self) -> None:
            self._header_timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being served (a pipelined one started meanwhile)
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11


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
