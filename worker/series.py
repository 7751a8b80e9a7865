"""The bound on distinct series per site: what a flood of new entity ids can cost.

Everything the worker keeps per series (the renderer's record with its topics, its
availability, the historian's id cache and its row in the ``series`` table) is made
the first time the series is seen, and kept. A source that invents entity ids, or any
publisher on the bus ingest, could make that grow without end. So a series is admitted
here before anything of it is kept: at most ``worker.max_series_per_site`` per site,
and at most ``worker.max_sites`` sites (any publisher can invent sites on the bus
ingest, and each would bring a bound of its own). A sample of a series past the bound
is refused (``too_many_series``, ``too_many_sites``) and dead-lettered; the series
already admitted go on. docs/worker.md ("Input limits") gives the memory per series.

The sets are the bound's own bookkeeping, bounded by the same two numbers. They live
as long as the worker: a series once admitted stays admitted, so the bound counts
what the worker keeps, which is never forgotten either.
"""

from __future__ import annotations

from energybus.errors import LimitError
from energybus.samples import SeriesKey

__all__ = ["SeriesBound"]


class SeriesBound:
    """Admits series per site up to the bound; shared by every pipeline's renderer (each
    asks once per series new to it) and the bus ingest (which asks per sample, a dict
    and a set lookup, since it keeps no record of its own)."""

    def __init__(self, *, max_series_per_site: int, max_sites: int) -> None:
        self.max_series_per_site = max_series_per_site
        self.max_sites = max_sites
        self._sites: dict[str, set[tuple[str, str]]] = {}
        self._count = 0

    @property
    def series(self) -> int:
        """Series admitted, over all sites."""
        return self._count

    @property
    def sites(self) -> int:
        return len(self._sites)

    def admit(self, key: SeriesKey) -> None:
        """Admit the series ``(site, entity_type, entity_id, metric)``, or raise
        :class:`LimitError`: the renderer's hook, asked for a series it has no record
        of."""
        site, entity_type, entity_id, metric = key
        self.admit_row(site, f"{entity_type}.{entity_id}", metric)

    def admit_row(self, site: str, device_id: str, metric: str) -> None:
        """Admit the series of a historian row (the historian's own key), or raise
        :class:`LimitError`."""
        known = self._sites.get(site)
        if known is None:
            if len(self._sites) >= self.max_sites:
                raise LimitError(
                    "too_many_sites",
                    f"site {site!r} is new and the worker keeps {self.max_sites:,} sites"
                    " already (worker.max_sites)",
                    setting="worker.max_sites",
                )
            known = self._sites[site] = set()
        key = (device_id, metric)
        if key in known:
            return
        if len(known) >= self.max_series_per_site:
            raise LimitError(
                "too_many_series",
                f"series {device_id} {metric} is new and site {site!r} has"
                f" {self.max_series_per_site:,} series already (worker.max_series_per_site)",
                setting="worker.max_series_per_site",
            )
        known.add(key)
        self._count += 1
