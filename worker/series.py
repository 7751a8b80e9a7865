"""The bound on distinct series per site: what a flood of new entity ids can cost.

Everything the worker keeps per series (the renderer's record with its topics, its
availability, the historian's id cache and its row in the ``series`` table) is made
the first time the series is seen, and kept. A source that invents entity ids, or any
publisher on the bus ingest (which can invent sites too), could make that grow without
end. So a series is admitted here before anything of it is kept: at most
``worker.max_series_per_site`` per site, so that a flood at one site leaves the others
their room, and at most ``worker.max_series`` in all, which is what bounds memory
however many sites are invented. A sample of a series past either is refused
(``too_many_series``, the message naming the setting) and dead-lettered; the series
already admitted go on. docs/worker.md ("Input limits") gives the memory per series.

The per-site sets are the bound's own bookkeeping: a site is kept only with a series
admitted, so there are never more sites than ``max_series``. They live as long as the
worker: a series once admitted stays admitted, as everything else kept of it does.
"""

from __future__ import annotations

from energybus.errors import LimitError
from energybus.samples import SeriesKey

__all__ = ["SeriesBound"]


class SeriesBound:
    """Admits series per site up to the bounds; shared by every pipeline's renderer (each
    asks once per series new to it) and the bus ingest (which asks per sample, a dict
    and a set lookup, since it keeps no record of its own)."""

    def __init__(self, *, max_series_per_site: int, max_series: int) -> None:
        self.max_series_per_site = max_series_per_site
        self.max_series = max_series
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
        key = (device_id, metric)
        if known is not None and key in known:
            return
        if known is not None and len(known) >= self.max_series_per_site:
            raise LimitError(
                "too_many_series",
                f"series {device_id} {metric} is new and site {site!r} has"
                f" {self.max_series_per_site:,} series already (worker.max_series_per_site)",
                setting="worker.max_series_per_site",
            )
        if self._count >= self.max_series:
            raise LimitError(
                "too_many_series",
                f"series {device_id} {metric} of site {site!r} is new and the worker keeps"
                f" {self.max_series:,} series already (worker.max_series)",
                setting="worker.max_series",
            )
        if known is None:
            known = self._sites[site] = set()
        known.add(key)
        self._count += 1
