"""The packaged mapping files, one per adapter, named after it (``ven.toml``, ``cpi.toml``).

A mapping file is data: adding a device or a field means editing one of these (or
passing another file with ``mapping = "..."`` in the adapter's options), not code.
"""

from __future__ import annotations

from pathlib import Path

from energybus.errors import MappingError

__all__ = ["mapping_directory", "mapping_names", "mapping_path", "packaged_files"]

_HERE = Path(__file__).resolve().parent


def mapping_directory(name: str) -> Path:
    """The packaged directory of adapter ``name``'s maps, for adapters with one file per
    device family (``modbus/``)."""
    return _HERE / name


def packaged_files() -> list[Path]:
    """Every packaged mapping file: one per adapter, then the device maps of the adapters
    that have a directory of them."""
    return sorted(_HERE.glob("*.toml")) + sorted(_HERE.glob("*/*.toml"))


def mapping_names() -> list[str]:
    """The adapters that have a packaged mapping file."""
    return sorted(path.stem for path in _HERE.glob("*.toml"))


def mapping_path(name: str) -> Path:
    """The packaged mapping file of adapter ``name``."""
    path = _HERE / f"{name}.toml"
    if not path.is_file():
        raise MappingError(
            "no_mapping",
            f"no packaged mapping for adapter {name!r}; packaged: {', '.join(mapping_names())}",
            file=str(path),
        )
    return path
