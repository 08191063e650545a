"""GPU offerings, prices and specs of several clouds: load, validate, query, refresh."""

from skybroker.catalog.schema import GPU, Catalog, Egress, Offering, Region

__all__ = ["GPU", "Catalog", "Egress", "Offering", "Region"]
