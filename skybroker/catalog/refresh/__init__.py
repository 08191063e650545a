"""Refresh the catalog from the clouds' own APIs: `skybroker catalog refresh --cloud ...`.

Each fetcher (aws.py, gcp.py, azure.py) returns Offerings; `write_catalog` writes them as a
user catalog directory (offerings.csv + sources.csv) that `--catalog DIR` or
$SKYBROKER_CATALOG_DIRS then merges over the bundled snapshot. Cloud SDKs are imported
inside the fetchers, so importing this package costs nothing.
"""

from __future__ import annotations

from skybroker.catalog.refresh.common import (
    FetchStats,
    RefreshError,
    ThrottledError,
    with_retries,
    write_catalog,
)

CLOUDS = ("aws", "gcp", "azure")

__all__ = [
    "CLOUDS",
    "FetchStats",
    "RefreshError",
    "ThrottledError",
    "with_retries",
    "write_catalog",
]
