"""``facefuse serve``: a resident ASGI service over the Python API (:mod:`facefuse.api`).

The model and the gallery stay loaded; photos come as multipart uploads and answers go back as
JSON. The pieces, one job each:

- :mod:`.settings`: :class:`ServeSettings`, every knob of the service in one frozen dataclass;
- :mod:`.uploads`: uploaded bytes -> an upright RGB image, with the byte and pixel limits;
- :mod:`.keys`: API keys, stored as SHA-256 digests, checked in constant time, read or write role;
- :mod:`.batcher`: concurrent requests' faces gathered into one model run (maximum batch and wait);
- :mod:`.engine`: the work of each endpoint (decode, detect, embed, search, enrol, remove) on
  thread pools, so the event loop never computes;
- :mod:`.metrics`: counters and histograms in Prometheus' text format;
- :mod:`.app`: the FastAPI routes, auth dependencies, error answers and limits;
- :mod:`.page`: the web page served at ``/``;
- :mod:`.cli`: the ``facefuse serve`` command (:data:`serve_command`).

Importing ``facefuse.serve`` imports nothing heavy; :func:`create_app` builds an app from settings.
"""

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def create_app(settings: ServeSettings):
    """The FastAPI application for ``settings`` (model and gallery load at startup)."""
    from .app import create_app as _create

    return _create(settings)
