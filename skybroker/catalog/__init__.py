"""GPU offerings, prices and specs of several clouds: load, validate, query, refresh.

from skybroker.catalog import load_catalog
catalog = load_catalog()                       # bundled snapshot (catalogs/)
catalog.query(gpu="H100", cloud="aws", spot=True, max_price=40)
"""

from skybroker.catalog.loader import CatalogError, load_catalog
from skybroker.catalog.schema import GPU, Catalog, Egress, Offering, Region

__all__ = ["GPU", "Catalog", "CatalogError", "Egress", "Offering", "Region", "load_catalog"]
