"""lakegate's optional parts, and the error that says which extra installs a missing one.

The core (stdio serving, governed SQL, metrics, documents, the embedded profile, the audit log)
needs no extra. The rest is installed on request, as pyiceberg does with its own extras:

    pip install 'lakegate[http]'       serve --http: Prometheus metrics (Starlette, uvicorn, PyJWT come with mcp)
    pip install 'lakegate[report]'     lakegate audit report: the HTML page's template and charts
    pip install 'lakegate[postgres]'   the production profile: catalog, policies and audit chain in PostgreSQL
    pip install 'lakegate[onnx]'       query embedding on ONNX Runtime, ~3x faster than torch (without: torch)
    pip install 'lakegate[spark]'      governed queries on Apache Spark (Spark Connect), and a local cluster
"""

from __future__ import annotations

import importlib.util

from lakegate.errors import ConfigurationError

__all__ = ["EXTRAS", "MissingExtra", "require_extra"]

#: Each extra, and the modules whose presence says it is installed.
EXTRAS: dict[str, tuple[str, ...]] = {
    "http": ("prometheus_client", "starlette", "uvicorn", "jwt"),
    "report": ("jinja2", "plotly"),
    "postgres": ("psycopg", "casbin_sqlalchemy_adapter"),
    "onnx": ("onnxruntime", "onnx"),
    "spark": ("pyspark", "grpc"),
}


class MissingExtra(ConfigurationError):
    """A feature needs an optional part of lakegate that is not installed."""

    def __init__(self, extra: str, feature: str, missing: str) -> None:
        super().__init__(
            f"{feature} needs lakegate's optional '{extra}' part, which is not installed (no module "
            f"{missing!r}): pip install 'lakegate[{extra}]'"
        )
        self.extra = extra


def require_extra(extra: str, feature: str) -> None:
    """Check that the modules of `extra` can be imported, before `feature` imports them.

    Raises:
        MissingExtra: one is missing; the message names the pip command that installs it.
    """
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent
            found = False
        if not found:
            raise MissingExtra(extra, feature, module)
