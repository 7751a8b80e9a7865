"""SunSpec devices as data: the model tables, and a register map built from a scan.

SunSpec devices describe themselves: after the marker ``SunS`` comes a chain of models,
each an ID register, a length and a fixed layout of points (the SunSpec Alliance's JSON
model definitions, github.com/sunspec/models). Where a model sits differs per device, so
a register map for one cannot be written once for a device family: it is the scan's
result (:mod:`energybus.worker.sunspec` walks the chain) put through :func:`device_map`,
which lays each known model's points onto the addresses found.

Only points that mean a canonical energybus metric are mapped; every other point is
listed under ``[ignore]`` with the reason, so the map says what was left out on purpose.
A metric appears once per map: a point the model marks mandatory gives it before an
optional one (``soc`` comes from 802's mandatory SoC, not 124's optional ChaState, which
a device may leave unimplemented), and among equals the model found first does
(``energy_total`` from 103 before 122); a point that would give it again is ignored,
naming the register that gives it.
Publishing the later one under a made-up name would put a second, unchecked series on
the bus for one quantity.

This module is pure: no I/O, only tables and functions over them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

from energybus.topics import ENTITY_TYPES

__all__ = [
    "BASE_ADDRESSES",
    "END_MODEL_ID",
    "MARKER",
    "MAX_MODELS",
    "MODELS",
    "FoundModel",
    "Model",
    "Point",
    "decode_string",
    "device_map",
    "model_name",
]

Access = Literal["R", "RW"]

MARKER: Final = (0x5375, 0x6E53)
"""``SunS`` in two registers: where the model chain starts."""
BASE_ADDRESSES: Final = (40000, 0, 50000)
"""Where the marker may be (PDU addresses), in the order pysunspec2 tries them."""
END_MODEL_ID: Final = 0xFFFF
"""The model ID that ends the chain (its length is not relied on)."""
MAX_MODELS: Final = 100
"""More models than this without an end marker is a broken chain, not a device."""
SOURCE_URL: Final = "https://github.com/sunspec/models"
SOURCE_VERSION: Final = "json/model_*.json at commit 7abdf8982d53"


class Point(NamedTuple):
    """One point of a model, at ``offset`` registers from the model's ID register."""

    name: str
    offset: int
    type: str
    """A type of :data:`~energybus.adapters.registers.REGISTER_TYPES`, or ``string`` and
    ``pad``, which no map reads but which keep the offsets after them right."""
    size: int
    """Registers taken."""
    units: str
    """SunSpec's unit, as its JSON spells it (``Pct``, ``% WChaMax``, ``C``)."""
    sf: str | None
    """The ``sunssf`` point of the same model that scales this one."""
    access: Access
    mandatory: bool
    description: str = ""
    metric: str | None = None
    """The canonical energybus metric, where one fits."""
    unit: str | None = None
    """The metric's source unit as energybus reads it (``degC`` for SunSpec's ``C``)."""
    scale: float = 1.0
    """A fixed factor before the scale factor (SunSpec's power factor is in percent)."""
    range: tuple[float, float] | None = None
    """Plausible values in the canonical unit, where the unit's default is too wide."""


class Model(NamedTuple):
    """One SunSpec model: ``length`` is its L, the registers after ID and L."""

    id: int
    name: str
    label: str
    length: int
    points: tuple[Point, ...]


class FoundModel(NamedTuple):
    """A model a scan found: its ID, the address of its ID register and its L."""

    model_id: int
    address: int
    length: int


class _Canonical(NamedTuple):
    metric: str
    unit: str | None
    scale: float = 1.0
    range: tuple[float, float] | None = None


_P = Point

# The model tables (generated from the sunspec/models JSON; .run/notes/modbus has the
# full tables with every enum symbol and bit). Columns: point, offset, type, size,
# SunSpec unit, scale-factor point, access, mandatory.

_M1: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("Mn", 2, "string", 16, "", None, "R", True),
    _P("Md", 18, "string", 16, "", None, "R", True),
    _P("Opt", 34, "string", 8, "", None, "R", False),
    _P("Vr", 42, "string", 8, "", None, "R", False),
    _P("SN", 50, "string", 16, "", None, "R", True),
    _P("DA", 66, "u16", 1, "", None, "RW", False),
    _P("Pad", 67, "pad", 1, "", None, "R", False),
)

_M103: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("A", 2, "u16", 1, "A", "A_SF", "R", True),
    _P("AphA", 3, "u16", 1, "A", "A_SF", "R", True),
    _P("AphB", 4, "u16", 1, "A", "A_SF", "R", True),
    _P("AphC", 5, "u16", 1, "A", "A_SF", "R", True),
    _P("A_SF", 6, "sunssf", 1, "", None, "R", True),
    _P("PPVphAB", 7, "u16", 1, "V", "V_SF", "R", False),
    _P("PPVphBC", 8, "u16", 1, "V", "V_SF", "R", False),
    _P("PPVphCA", 9, "u16", 1, "V", "V_SF", "R", False),
    _P("PhVphA", 10, "u16", 1, "V", "V_SF", "R", True),
    _P("PhVphB", 11, "u16", 1, "V", "V_SF", "R", True),
    _P("PhVphC", 12, "u16", 1, "V", "V_SF", "R", True),
    _P("V_SF", 13, "sunssf", 1, "", None, "R", True),
    _P("W", 14, "s16", 1, "W", "W_SF", "R", True),
    _P("W_SF", 15, "sunssf", 1, "", None, "R", True),
    _P("Hz", 16, "u16", 1, "Hz", "Hz_SF", "R", True),
    _P("Hz_SF", 17, "sunssf", 1, "", None, "R", True),
    _P("VA", 18, "s16", 1, "VA", "VA_SF", "R", False),
    _P("VA_SF", 19, "sunssf", 1, "", None, "R", False),
    _P("VAr", 20, "s16", 1, "var", "VAr_SF", "R", False),
    _P("VAr_SF", 21, "sunssf", 1, "", None, "R", False),
    _P("PF", 22, "s16", 1, "Pct", "PF_SF", "R", False),
    _P("PF_SF", 23, "sunssf", 1, "", None, "R", False),
    _P("WH", 24, "acc32", 2, "Wh", "WH_SF", "R", True),
    _P("WH_SF", 26, "sunssf", 1, "", None, "R", True),
    _P("DCA", 27, "u16", 1, "A", "DCA_SF", "R", False),
    _P("DCA_SF", 28, "sunssf", 1, "", None, "R", False),
    _P("DCV", 29, "u16", 1, "V", "DCV_SF", "R", False),
    _P("DCV_SF", 30, "sunssf", 1, "", None, "R", False),
    _P("DCW", 31, "s16", 1, "W", "DCW_SF", "R", False),
    _P("DCW_SF", 32, "sunssf", 1, "", None, "R", False),
    _P("TmpCab", 33, "s16", 1, "C", "Tmp_SF", "R", True),
    _P("TmpSnk", 34, "s16", 1, "C", "Tmp_SF", "R", False),
    _P("TmpTrns", 35, "s16", 1, "C", "Tmp_SF", "R", False),
    _P("TmpOt", 36, "s16", 1, "C", "Tmp_SF", "R", False),
    _P("Tmp_SF", 37, "sunssf", 1, "", None, "R", True),
    _P("St", 38, "enum16", 1, "", None, "R", True),
    _P("StVnd", 39, "enum16", 1, "", None, "R", False),
    _P("Evt1", 40, "bitfield32", 2, "", None, "R", True),
    _P("Evt2", 42, "bitfield32", 2, "", None, "R", True),
    _P("EvtVnd1", 44, "bitfield32", 2, "", None, "R", False),
    _P("EvtVnd2", 46, "bitfield32", 2, "", None, "R", False),
    _P("EvtVnd3", 48, "bitfield32", 2, "", None, "R", False),
    _P("EvtVnd4", 50, "bitfield32", 2, "", None, "R", False),
)

_M120: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("DERTyp", 2, "enum16", 1, "", None, "R", True),
    _P("WRtg", 3, "u16", 1, "W", "WRtg_SF", "R", True),
    _P("WRtg_SF", 4, "sunssf", 1, "", None, "R", True),
    _P("VARtg", 5, "u16", 1, "VA", "VARtg_SF", "R", True),
    _P("VARtg_SF", 6, "sunssf", 1, "", None, "R", True),
    _P("VArRtgQ1", 7, "s16", 1, "var", "VArRtg_SF", "R", True),
    _P("VArRtgQ2", 8, "s16", 1, "var", "VArRtg_SF", "R", True),
    _P("VArRtgQ3", 9, "s16", 1, "var", "VArRtg_SF", "R", True),
    _P("VArRtgQ4", 10, "s16", 1, "var", "VArRtg_SF", "R", True),
    _P("VArRtg_SF", 11, "sunssf", 1, "", None, "R", True),
    _P("ARtg", 12, "u16", 1, "A", "ARtg_SF", "R", True),
    _P("ARtg_SF", 13, "sunssf", 1, "", None, "R", True),
    _P("PFRtgQ1", 14, "s16", 1, "cos()", "PFRtg_SF", "R", True),
    _P("PFRtgQ2", 15, "s16", 1, "cos()", "PFRtg_SF", "R", True),
    _P("PFRtgQ3", 16, "s16", 1, "cos()", "PFRtg_SF", "R", True),
    _P("PFRtgQ4", 17, "s16", 1, "cos()", "PFRtg_SF", "R", True),
    _P("PFRtg_SF", 18, "sunssf", 1, "", None, "R", True),
    _P("WHRtg", 19, "u16", 1, "Wh", "WHRtg_SF", "R", False),
    _P("WHRtg_SF", 20, "sunssf", 1, "", None, "R", False),
    _P("AhrRtg", 21, "u16", 1, "AH", "AhrRtg_SF", "R", False),
    _P("AhrRtg_SF", 22, "sunssf", 1, "", None, "R", False),
    _P("MaxChaRte", 23, "u16", 1, "W", "MaxChaRte_SF", "R", False),
    _P("MaxChaRte_SF", 24, "sunssf", 1, "", None, "R", False),
    _P("MaxDisChaRte", 25, "u16", 1, "W", "MaxDisChaRte_SF", "R", False),
    _P("MaxDisChaRte_SF", 26, "sunssf", 1, "", None, "R", False),
    _P("Pad", 27, "pad", 1, "", None, "R", False),
)

_M121: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("WMax", 2, "u16", 1, "W", "WMax_SF", "RW", True),
    _P("VRef", 3, "u16", 1, "V", "VRef_SF", "RW", True),
    _P("VRefOfs", 4, "s16", 1, "V", "VRefOfs_SF", "RW", True),
    _P("VMax", 5, "u16", 1, "V", "VMinMax_SF", "RW", False),
    _P("VMin", 6, "u16", 1, "V", "VMinMax_SF", "RW", False),
    _P("VAMax", 7, "u16", 1, "VA", "VAMax_SF", "RW", False),
    _P("VArMaxQ1", 8, "s16", 1, "var", "VArMax_SF", "RW", False),
    _P("VArMaxQ2", 9, "s16", 1, "var", "VArMax_SF", "RW", False),
    _P("VArMaxQ3", 10, "s16", 1, "var", "VArMax_SF", "RW", False),
    _P("VArMaxQ4", 11, "s16", 1, "var", "VArMax_SF", "RW", False),
    _P("WGra", 12, "u16", 1, "% WMax/sec", "WGra_SF", "RW", False),
    _P("PFMinQ1", 13, "s16", 1, "cos()", "PFMin_SF", "RW", False),
    _P("PFMinQ2", 14, "s16", 1, "cos()", "PFMin_SF", "RW", False),
    _P("PFMinQ3", 15, "s16", 1, "cos()", "PFMin_SF", "RW", False),
    _P("PFMinQ4", 16, "s16", 1, "cos()", "PFMin_SF", "RW", False),
    _P("VArAct", 17, "enum16", 1, "", None, "RW", False),
    _P("ClcTotVA", 18, "enum16", 1, "", None, "RW", False),
    _P("MaxRmpRte", 19, "u16", 1, "% WGra", "MaxRmpRte_SF", "RW", False),
    _P("ECPNomHz", 20, "u16", 1, "Hz", "ECPNomHz_SF", "RW", False),
    _P("ConnPh", 21, "enum16", 1, "", None, "RW", False),
    _P("WMax_SF", 22, "sunssf", 1, "", None, "R", True),
    _P("VRef_SF", 23, "sunssf", 1, "", None, "R", True),
    _P("VRefOfs_SF", 24, "sunssf", 1, "", None, "R", True),
    _P("VMinMax_SF", 25, "sunssf", 1, "", None, "R", False),
    _P("VAMax_SF", 26, "sunssf", 1, "", None, "R", False),
    _P("VArMax_SF", 27, "sunssf", 1, "", None, "R", False),
    _P("WGra_SF", 28, "sunssf", 1, "", None, "R", False),
    _P("PFMin_SF", 29, "sunssf", 1, "", None, "R", False),
    _P("MaxRmpRte_SF", 30, "sunssf", 1, "", None, "R", False),
    _P("ECPNomHz_SF", 31, "sunssf", 1, "", None, "R", False),
)

_M122: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("PVConn", 2, "bitfield16", 1, "", None, "R", True),
    _P("StorConn", 3, "bitfield16", 1, "", None, "R", True),
    _P("ECPConn", 4, "bitfield16", 1, "", None, "R", True),
    _P("ActWh", 5, "acc64", 4, "Wh", None, "R", False),
    _P("ActVAh", 9, "acc64", 4, "VAh", None, "R", False),
    _P("ActVArhQ1", 13, "acc64", 4, "varh", None, "R", False),
    _P("ActVArhQ2", 17, "acc64", 4, "varh", None, "R", False),
    _P("ActVArhQ3", 21, "acc64", 4, "varh", None, "R", False),
    _P("ActVArhQ4", 25, "acc64", 4, "varh", None, "R", False),
    _P("VArAval", 29, "s16", 1, "var", "VArAval_SF", "R", False),
    _P("VArAval_SF", 30, "sunssf", 1, "", None, "R", False),
    _P("WAval", 31, "u16", 1, "var", "WAval_SF", "R", False),
    _P("WAval_SF", 32, "sunssf", 1, "", None, "R", False),
    _P("StSetLimMsk", 33, "bitfield32", 2, "", None, "R", False),
    _P("StActCtl", 35, "bitfield32", 2, "", None, "R", False),
    _P("TmSrc", 37, "string", 4, "", None, "R", False),
    _P("Tms", 41, "u32", 2, "Secs", None, "R", False),
    _P("RtSt", 43, "bitfield16", 1, "", None, "R", False),
    _P("Ris", 44, "u16", 1, "ohms", "Ris_SF", "R", False),
    _P("Ris_SF", 45, "sunssf", 1, "", None, "R", False),
)

_M123: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("Conn_WinTms", 2, "u16", 1, "Secs", None, "RW", False),
    _P("Conn_RvrtTms", 3, "u16", 1, "Secs", None, "RW", False),
    _P("Conn", 4, "enum16", 1, "", None, "RW", True),
    _P("WMaxLimPct", 5, "u16", 1, "% WMax", "WMaxLimPct_SF", "RW", True),
    _P("WMaxLimPct_WinTms", 6, "u16", 1, "Secs", None, "RW", False),
    _P("WMaxLimPct_RvrtTms", 7, "u16", 1, "Secs", None, "RW", False),
    _P("WMaxLimPct_RmpTms", 8, "u16", 1, "Secs", None, "RW", False),
    _P("WMaxLim_Ena", 9, "enum16", 1, "", None, "RW", True),
    _P("OutPFSet", 10, "s16", 1, "cos()", "OutPFSet_SF", "RW", True),
    _P("OutPFSet_WinTms", 11, "u16", 1, "Secs", None, "RW", False),
    _P("OutPFSet_RvrtTms", 12, "u16", 1, "Secs", None, "RW", False),
    _P("OutPFSet_RmpTms", 13, "u16", 1, "Secs", None, "RW", False),
    _P("OutPFSet_Ena", 14, "enum16", 1, "", None, "RW", True),
    _P("VArWMaxPct", 15, "s16", 1, "% WMax", "VArPct_SF", "RW", False),
    _P("VArMaxPct", 16, "s16", 1, "% VArMax", "VArPct_SF", "RW", False),
    _P("VArAvalPct", 17, "s16", 1, "% VArAval", "VArPct_SF", "RW", False),
    _P("VArPct_WinTms", 18, "u16", 1, "Secs", None, "RW", False),
    _P("VArPct_RvrtTms", 19, "u16", 1, "Secs", None, "RW", False),
    _P("VArPct_RmpTms", 20, "u16", 1, "Secs", None, "RW", False),
    _P("VArPct_Mod", 21, "enum16", 1, "", None, "RW", False),
    _P("VArPct_Ena", 22, "enum16", 1, "", None, "RW", True),
    _P("WMaxLimPct_SF", 23, "sunssf", 1, "", None, "R", True),
    _P("OutPFSet_SF", 24, "sunssf", 1, "", None, "R", True),
    _P("VArPct_SF", 25, "sunssf", 1, "", None, "R", False),
)

_M124: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("WChaMax", 2, "u16", 1, "W", "WChaMax_SF", "RW", True),
    _P("WChaGra", 3, "u16", 1, "% WChaMax/sec", "WChaDisChaGra_SF", "RW", True),
    _P("WDisChaGra", 4, "u16", 1, "% WChaMax/sec", "WChaDisChaGra_SF", "RW", True),
    _P("StorCtl_Mod", 5, "bitfield16", 1, "", None, "RW", True),
    _P("VAChaMax", 6, "u16", 1, "VA", "VAChaMax_SF", "RW", False),
    _P("MinRsvPct", 7, "u16", 1, "% WChaMax", "MinRsvPct_SF", "RW", False),
    _P("ChaState", 8, "u16", 1, "% AhrRtg", "ChaState_SF", "R", False),
    _P("StorAval", 9, "u16", 1, "AH", "StorAval_SF", "R", False),
    _P("InBatV", 10, "u16", 1, "V", "InBatV_SF", "R", False),
    _P("ChaSt", 11, "enum16", 1, "", None, "R", False),
    _P("OutWRte", 12, "s16", 1, "% WDisChaMax", "InOutWRte_SF", "RW", False),
    _P("InWRte", 13, "s16", 1, "% WChaMax", "InOutWRte_SF", "RW", False),
    _P("InOutWRte_WinTms", 14, "u16", 1, "Secs", None, "RW", False),
    _P("InOutWRte_RvrtTms", 15, "u16", 1, "Secs", None, "RW", False),
    _P("InOutWRte_RmpTms", 16, "u16", 1, "Secs", None, "RW", False),
    _P("ChaGriSet", 17, "enum16", 1, "", None, "RW", False),
    _P("WChaMax_SF", 18, "sunssf", 1, "", None, "R", True),
    _P("WChaDisChaGra_SF", 19, "sunssf", 1, "", None, "R", True),
    _P("VAChaMax_SF", 20, "sunssf", 1, "", None, "R", False),
    _P("MinRsvPct_SF", 21, "sunssf", 1, "", None, "R", False),
    _P("ChaState_SF", 22, "sunssf", 1, "", None, "R", False),
    _P("StorAval_SF", 23, "sunssf", 1, "", None, "R", False),
    _P("InBatV_SF", 24, "sunssf", 1, "", None, "R", False),
    _P("InOutWRte_SF", 25, "sunssf", 1, "", None, "R", False),
)

_M802: Final = (
    _P("ID", 0, "u16", 1, "", None, "R", True),
    _P("L", 1, "u16", 1, "", None, "R", True),
    _P("AHRtg", 2, "u16", 1, "Ah", "AHRtg_SF", "R", True),
    _P("WHRtg", 3, "u16", 1, "Wh", "WHRtg_SF", "R", True),
    _P("WChaRteMax", 4, "u16", 1, "W", "WChaDisChaMax_SF", "R", True),
    _P("WDisChaRteMax", 5, "u16", 1, "W", "WChaDisChaMax_SF", "R", True),
    _P("DisChaRte", 6, "u16", 1, "%WHRtg", "DisChaRte_SF", "R", False),
    _P("SoCMax", 7, "u16", 1, "%WHRtg", "SoC_SF", "R", False),
    _P("SoCMin", 8, "u16", 1, "%WHRtg", "SoC_SF", "R", False),
    _P("SocRsvMax", 9, "u16", 1, "%WHRtg", "SoC_SF", "RW", False),
    _P("SoCRsvMin", 10, "u16", 1, "%WHRtg", "SoC_SF", "RW", False),
    _P("SoC", 11, "u16", 1, "%WHRtg", "SoC_SF", "R", True),
    _P("DoD", 12, "u16", 1, "%", "DoD_SF", "R", False),
    _P("SoH", 13, "u16", 1, "%", "SoH_SF", "R", False),
    _P("NCyc", 14, "u32", 2, "", None, "R", False),
    _P("ChaSt", 16, "enum16", 1, "", None, "R", False),
    _P("LocRemCtl", 17, "enum16", 1, "", None, "R", True),
    _P("Hb", 18, "u16", 1, "", None, "R", False),
    _P("CtrlHb", 19, "u16", 1, "", None, "RW", False),
    _P("AlmRst", 20, "u16", 1, "", None, "RW", True),
    _P("Typ", 21, "enum16", 1, "", None, "R", True),
    _P("State", 22, "enum16", 1, "", None, "R", True),
    _P("StateVnd", 23, "enum16", 1, "", None, "R", False),
    _P("WarrDt", 24, "u32", 2, "", None, "R", False),
    _P("Evt1", 26, "bitfield32", 2, "", None, "R", True),
    _P("Evt2", 28, "bitfield32", 2, "", None, "R", True),
    _P("EvtVnd1", 30, "bitfield32", 2, "", None, "R", True),
    _P("EvtVnd2", 32, "bitfield32", 2, "", None, "R", True),
    _P("V", 34, "u16", 1, "V", "V_SF", "R", True),
    _P("VMax", 35, "u16", 1, "V", "V_SF", "R", False),
    _P("VMin", 36, "u16", 1, "V", "V_SF", "R", False),
    _P("CellVMax", 37, "u16", 1, "V", "CellV_SF", "R", False),
    _P("CellVMaxStr", 38, "u16", 1, "", None, "R", False),
    _P("CellVMaxMod", 39, "u16", 1, "", None, "R", False),
    _P("CellVMin", 40, "u16", 1, "V", "CellV_SF", "R", False),
    _P("CellVMinStr", 41, "u16", 1, "", None, "R", False),
    _P("CellVMinMod", 42, "u16", 1, "", None, "R", False),
    _P("CellVAvg", 43, "u16", 1, "V", "CellV_SF", "R", False),
    _P("A", 44, "s16", 1, "A", "A_SF", "R", True),
    _P("AChaMax", 45, "u16", 1, "A", "AMax_SF", "R", False),
    _P("ADisChaMax", 46, "u16", 1, "A", "AMax_SF", "R", False),
    _P("W", 47, "s16", 1, "W", "W_SF", "R", True),
    _P("ReqInvState", 48, "enum16", 1, "", None, "R", False),
    _P("ReqW", 49, "s16", 1, "W", "W_SF", "R", False),
    _P("SetOp", 50, "enum16", 1, "", None, "RW", True),
    _P("SetInvState", 51, "enum16", 1, "", None, "RW", True),
    _P("AHRtg_SF", 52, "sunssf", 1, "", None, "R", True),
    _P("WHRtg_SF", 53, "sunssf", 1, "", None, "R", True),
    _P("WChaDisChaMax_SF", 54, "sunssf", 1, "", None, "R", True),
    _P("DisChaRte_SF", 55, "sunssf", 1, "", None, "R", False),
    _P("SoC_SF", 56, "sunssf", 1, "", None, "R", True),
    _P("DoD_SF", 57, "sunssf", 1, "", None, "R", False),
    _P("SoH_SF", 58, "sunssf", 1, "", None, "R", False),
    _P("V_SF", 59, "sunssf", 1, "", None, "R", True),
    _P("CellV_SF", 60, "sunssf", 1, "", None, "R", True),
    _P("A_SF", 61, "sunssf", 1, "", None, "R", True),
    _P("AMax_SF", 62, "sunssf", 1, "", None, "R", True),
    _P("W_SF", 63, "sunssf", 1, "", None, "R", False),
)


# SunSpec's descriptions, first sentence (they become the rows' descriptions and reasons).
_ABOUT: Final[dict[int, dict[str, str]]] = {
    1: {
        "ID": "Model identifier",
        "L": "Model length",
        "Mn": "Manufacturer",
        "Md": "Model",
        "Opt": "Options",
        "Vr": "Version",
        "SN": "Serial Number",
        "DA": "Modbus device address",
        "Pad": "Force even alignment",
    },
    103: {
        "ID": "Model identifier",
        "L": "Model length",
        "A": "AC Current",
        "AphA": "Phase A Current",
        "AphB": "Phase B Current",
        "AphC": "Phase C Current",
        "A_SF": "Scale factor",
        "PPVphAB": "Phase Voltage AB",
        "PPVphBC": "Phase Voltage BC",
        "PPVphCA": "Phase Voltage CA",
        "PhVphA": "Phase Voltage AN",
        "PhVphB": "Phase Voltage BN",
        "PhVphC": "Phase Voltage CN",
        "V_SF": "Scale factor",
        "W": "AC Power",
        "W_SF": "Scale factor",
        "Hz": "Line Frequency",
        "Hz_SF": "Scale factor",
        "VA": "AC Apparent Power",
        "VA_SF": "Scale factor",
        "VAr": "AC Reactive Power",
        "VAr_SF": "Scale factor",
        "PF": "AC Power Factor",
        "PF_SF": "Scale factor",
        "WH": "AC Energy",
        "WH_SF": "Scale factor",
        "DCA": "DC Current",
        "DCA_SF": "Scale factor",
        "DCV": "DC Voltage",
        "DCV_SF": "Scale factor",
        "DCW": "DC Power",
        "DCW_SF": "Scale factor",
        "TmpCab": "Cabinet Temperature",
        "TmpSnk": "Heat Sink Temperature",
        "TmpTrns": "Transformer Temperature",
        "TmpOt": "Other Temperature",
        "Tmp_SF": "Scale factor",
        "St": "Operating state",
        "StVnd": "Vendor specific operating state code",
        "Evt1": "Event fields",
        "Evt2": "Reserved for future use",
        "EvtVnd1": "Vendor defined events",
        "EvtVnd2": "Vendor defined events",
        "EvtVnd3": "Vendor defined events",
        "EvtVnd4": "Vendor defined events",
    },
    120: {
        "ID": "Model identifier",
        "L": "Model length",
        "DERTyp": "Type of DER device",
        "WRtg": "Continuous power output capability of the inverter",
        "WRtg_SF": "Scale factor",
        "VARtg": "Continuous Volt-Ampere capability of the inverter",
        "VARtg_SF": "Scale factor",
        "VArRtgQ1": "Continuous VAR capability of the inverter in quadrant 1",
        "VArRtgQ2": "Continuous VAR capability of the inverter in quadrant 2",
        "VArRtgQ3": "Continuous VAR capability of the inverter in quadrant 3",
        "VArRtgQ4": "Continuous VAR capability of the inverter in quadrant 4",
        "VArRtg_SF": "Scale factor",
        "ARtg": "Maximum RMS AC current level capability of the inverter",
        "ARtg_SF": "Scale factor",
        "PFRtgQ1": "Minimum power factor capability of the inverter in quadrant 1",
        "PFRtgQ2": "Minimum power factor capability of the inverter in quadrant 2",
        "PFRtgQ3": "Minimum power factor capability of the inverter in quadrant 3",
        "PFRtgQ4": "Minimum power factor capability of the inverter in quadrant 4",
        "PFRtg_SF": "Scale factor",
        "WHRtg": "Nominal energy rating of storage device",
        "WHRtg_SF": "Scale factor",
        "AhrRtg": "The usable capacity of the battery",
        "AhrRtg_SF": "Scale factor for amp-hour rating",
        "MaxChaRte": "Maximum rate of energy transfer into the storage device",
        "MaxChaRte_SF": "Scale factor",
        "MaxDisChaRte": "Maximum rate of energy transfer out of the storage device",
        "MaxDisChaRte_SF": "Scale factor",
        "Pad": "Pad register",
    },
    121: {
        "ID": "Model identifier",
        "L": "Model length",
        "WMax": "Setting for maximum power output",
        "VRef": "Voltage at the PCC",
        "VRefOfs": "Offset from PCC to inverter",
        "VMax": "Setpoint for maximum voltage",
        "VMin": "Setpoint for minimum voltage",
        "VAMax": "Setpoint for maximum apparent power",
        "VArMaxQ1": "Setting for maximum reactive power in quadrant 1",
        "VArMaxQ2": "Setting for maximum reactive power in quadrant 2",
        "VArMaxQ3": "Setting for maximum reactive power in quadrant 3",
        "VArMaxQ4": "Setting for maximum reactive power in quadrant 4",
        "WGra": "Default ramp rate of change of active power due to command or internal action",
        "PFMinQ1": "Setpoint for minimum power factor value in quadrant 1",
        "PFMinQ2": "Setpoint for minimum power factor value in quadrant 2",
        "PFMinQ3": "Setpoint for minimum power factor value in quadrant 3",
        "PFMinQ4": "Setpoint for minimum power factor value in quadrant 4",
        "VArAct": "VAR action on change between charging and discharging",
        "ClcTotVA": "Calculation method for total apparent power",
        "MaxRmpRte": "Setpoint for maximum ramp rate as percentage of nominal maximum ramp rate",
        "ECPNomHz": "Setpoint for nominal frequency at the ECP",
        "ConnPh": "Identity of connected phase for single phase inverters",
        "WMax_SF": "Scale factor for real power",
        "VRef_SF": "Scale factor for voltage at the PCC",
        "VRefOfs_SF": "Scale factor for offset voltage",
        "VMinMax_SF": "Scale factor for min/max voltages",
        "VAMax_SF": "Scale factor for apparent power",
        "VArMax_SF": "Scale factor for reactive power",
        "WGra_SF": "Scale factor for default ramp rate",
        "PFMin_SF": "Scale factor for minimum power factor",
        "MaxRmpRte_SF": "Scale factor for maximum ramp percentage",
        "ECPNomHz_SF": "Scale factor for nominal frequency",
    },
    122: {
        "ID": "Model identifier",
        "L": "Model length",
        "PVConn": "PV inverter present/available status",
        "StorConn": "Storage inverter present/available status",
        "ECPConn": "ECP connection status: disconnected=0 connected=1",
        "ActWh": "AC lifetime active (real) energy output",
        "ActVAh": "AC lifetime apparent energy output",
        "ActVArhQ1": "AC lifetime reactive energy output in quadrant 1",
        "ActVArhQ2": "AC lifetime reactive energy output in quadrant 2",
        "ActVArhQ3": "AC lifetime negative energy output in quadrant 3",
        "ActVArhQ4": "AC lifetime reactive energy output in quadrant 4",
        "VArAval": "Amount of VARs available without impacting watts output",
        "VArAval_SF": "Scale factor for available VARs",
        "WAval": "Amount of Watts available",
        "WAval_SF": "Scale factor for available Watts",
        "StSetLimMsk": "Setpoint limit(s) reached",
        "StActCtl": "Which inverter controls are currently active",
        "TmSrc": "Source of time synchronization",
        "Tms": "Seconds since 01-01-2000 00:00 UTC",
        "RtSt": "Active ride-through status",
        "Ris": "Isolation resistance",
        "Ris_SF": "Scale factor for isolation resistance",
    },
    123: {
        "ID": "Model identifier",
        "L": "Model length",
        "Conn_WinTms": "Time window for connect/disconnect",
        "Conn_RvrtTms": "Timeout period for connect/disconnect",
        "Conn": "Connection control",
        "WMaxLimPct": "Set power output to specified level",
        "WMaxLimPct_WinTms": "Time window for power limit change",
        "WMaxLimPct_RvrtTms": "Timeout period for power limit",
        "WMaxLimPct_RmpTms": "Ramp time for moving from current setpoint to new setpoint",
        "WMaxLim_Ena": "Throttle enable/disable control",
        "OutPFSet": "Set power factor to specific value - cosine of angle",
        "OutPFSet_WinTms": "Time window for power factor change",
        "OutPFSet_RvrtTms": "Timeout period for power factor",
        "OutPFSet_RmpTms": "Ramp time for moving from current setpoint to new setpoint",
        "OutPFSet_Ena": "Fixed power factor enable/disable control",
        "VArWMaxPct": "Reactive power in percent of WMax",
        "VArMaxPct": "Reactive power in percent of VArMax",
        "VArAvalPct": "Reactive power in percent of VArAval",
        "VArPct_WinTms": "Time window for VAR limit change",
        "VArPct_RvrtTms": "Timeout period for VAR limit",
        "VArPct_RmpTms": "Ramp time for moving from current setpoint to new setpoint",
        "VArPct_Mod": "VAR percent limit mode",
        "VArPct_Ena": "Percent limit VAr enable/disable control",
        "WMaxLimPct_SF": "Scale factor for power output percent",
        "OutPFSet_SF": "Scale factor for power factor",
        "VArPct_SF": "Scale factor for reactive power percent",
    },
    124: {
        "ID": "Model identifier",
        "L": "Model length",
        "WChaMax": "Setpoint for maximum charge",
        "WChaGra": "Setpoint for maximum charging rate",
        "WDisChaGra": "Setpoint for maximum discharge rate",
        "StorCtl_Mod": "Activate hold/discharge/charge storage control mode",
        "VAChaMax": "Setpoint for maximum charging VA",
        "MinRsvPct": "Setpoint for minimum reserve for storage",
        "ChaState": "Currently available energy as a percent of the capacity rating",
        "StorAval": "State of charge minus storage reserve times capacity rating",
        "InBatV": "Internal battery voltage",
        "ChaSt": "Charge status of storage device",
        "OutWRte": "Percent of max discharge rate",
        "InWRte": "Percent of max charging rate",
        "InOutWRte_WinTms": "Time window for charge/discharge rate change",
        "InOutWRte_RvrtTms": "Timeout period for charge/discharge rate",
        "InOutWRte_RmpTms": "Ramp time for moving from current setpoint to new setpoint",
        "ChaGriSet": "Whether charging from the grid is allowed (0 PV, 1 GRID)",
        "WChaMax_SF": "Scale factor for maximum charge",
        "WChaDisChaGra_SF": "Scale factor for maximum charge and discharge rate",
        "VAChaMax_SF": "Scale factor for maximum charging VA",
        "MinRsvPct_SF": "Scale factor for minimum reserve percentage",
        "ChaState_SF": "Scale factor for available energy percent",
        "StorAval_SF": "Scale factor for state of charge",
        "InBatV_SF": "Scale factor for battery voltage",
        "InOutWRte_SF": "Scale factor for percent charge/discharge rate",
    },
    802: {
        "ID": "Model identifier",
        "L": "Model length",
        "AHRtg": "Nameplate charge capacity in amp-hours",
        "WHRtg": "Nameplate energy capacity in DC watt-hours",
        "WChaRteMax": "Maximum rate of energy transfer into the storage device in DC watts",
        "WDisChaRteMax": "Maximum rate of energy transfer out of the storage device in DC watts",
        "DisChaRte": "Self discharge rate",
        "SoCMax": "Manufacturer maximum state of charge, expressed as a percentage",
        "SoCMin": "Manufacturer minimum state of charge, expressed as a percentage",
        "SocRsvMax": "Setpoint for maximum reserve for storage",
        "SoCRsvMin": "Setpoint for minimum reserve for storage",
        "SoC": "State of charge, expressed as a percentage",
        "DoD": "Depth of discharge, expressed as a percentage",
        "SoH": "Percentage of battery life remaining",
        "NCyc": "Number of cycles executed in the battery",
        "ChaSt": "Charge status of storage device",
        "LocRemCtl": "Battery control mode",
        "Hb": "Value is incremented every second with periodic resets to zero",
        "CtrlHb": "Value is incremented every second with periodic resets to zero",
        "AlmRst": "Used to reset any latched alarms",
        "Typ": "Type of battery",
        "State": "State of the battery bank",
        "StateVnd": "Vendor specific battery bank state",
        "WarrDt": "Date the device warranty expires",
        "Evt1": "Alarms and warnings",
        "Evt2": "Alarms and warnings",
        "EvtVnd1": "Vendor defined events",
        "EvtVnd2": "Vendor defined events",
        "V": "DC Bus Voltage",
        "VMax": "Instantaneous maximum battery voltage",
        "VMin": "Instantaneous minimum battery voltage",
        "CellVMax": "Maximum voltage for all cells in the bank",
        "CellVMaxStr": "String containing the cell with maximum voltage",
        "CellVMaxMod": "Module containing the cell with maximum voltage",
        "CellVMin": "Minimum voltage for all cells in the bank",
        "CellVMinStr": "String containing the cell with minimum voltage",
        "CellVMinMod": "Module containing the cell with minimum voltage",
        "CellVAvg": "Average cell voltage for all cells in the bank",
        "A": "Total DC current flowing to/from the battery bank",
        "AChaMax": "Instantaneous maximum DC charge current",
        "ADisChaMax": "Instantaneous maximum DC discharge current",
        "W": "Total power flowing to/from the battery bank",
        "ReqInvState": "Request from battery to start or stop the inverter",
        "ReqW": "AC Power requested by battery",
        "SetOp": "Instruct the battery bank to perform an operation such as connecting",
        "SetInvState": "Set the current state of the inverter",
        "AHRtg_SF": "Scale factor for charge capacity",
        "WHRtg_SF": "Scale factor for energy capacity",
        "WChaDisChaMax_SF": "Scale factor for maximum charge and discharge rate",
        "DisChaRte_SF": "Scale factor for self discharge rate",
        "SoC_SF": "Scale factor for state of charge values",
        "DoD_SF": "Scale factor for depth of discharge",
        "SoH_SF": "Scale factor for state of health",
        "V_SF": "Scale factor for DC bus voltage",
        "CellV_SF": "Scale factor for cell voltage",
        "A_SF": "Scale factor for DC current",
        "AMax_SF": "Scale factor for instantaneous DC charge/discharge current",
        "W_SF": "Scale factor for AC power request",
    },
}

# Canonical metrics, by model and point. Only the AC side of the inverter models and the
# battery's own state have canonical metrics: the bus has no DC or nameplate metrics.
_AC_SIDE: Final = {
    "A": _Canonical("current", "A"),
    "AphA": _Canonical("current_l1", "A"),
    "AphB": _Canonical("current_l2", "A"),
    "AphC": _Canonical("current_l3", "A"),
    "PhVphA": _Canonical("voltage_l1", "V"),
    "PhVphB": _Canonical("voltage_l2", "V"),
    "PhVphC": _Canonical("voltage_l3", "V"),
    "W": _Canonical("active_power", "W"),
    "Hz": _Canonical("frequency", "Hz"),
    "VA": _Canonical("apparent_power", "VA"),
    "VAr": _Canonical("reactive_power", "var"),
    # SunSpec's PF is in percent ("Pct"); the bus's power factor runs from -1 to 1.
    "PF": _Canonical("power_factor", None, 0.01, (-1.0, 1.0)),
    "WH": _Canonical("energy_total", "Wh"),
    "TmpCab": _Canonical("temperature", "degC"),
}
_PHASES_B_C: Final = frozenset({"AphB", "AphC", "PhVphB", "PhVphC"})

_CANONICAL: Final[dict[int, dict[str, _Canonical]]] = {
    # A single-phase inverter leaves phases B and C unimplemented (optional in 101).
    101: {k: v for k, v in _AC_SIDE.items() if k not in _PHASES_B_C},
    103: _AC_SIDE,
    122: {"ActWh": _Canonical("energy_total", "Wh")},
    # WChaMax is the charge limit the device applies now, and it is writable: the
    # setpoint a site controls. ChaState is in percent of AhrRtg.
    124: {"WChaMax": _Canonical("max_charge_power", "W"), "ChaState": _Canonical("soc", "%")},
    802: {"SoC": _Canonical("soc", "%"), "SoH": _Canonical("soh", "%")},
}

_INVERTER_WHY: Final = {
    "PPVphAB": "line-to-line voltage: the bus has phase-to-neutral voltages",
    "PPVphBC": "line-to-line voltage: the bus has phase-to-neutral voltages",
    "PPVphCA": "line-to-line voltage: the bus has phase-to-neutral voltages",
    "DCA": "the inverter's DC side: the bus has no DC metrics",
    "DCV": "the inverter's DC side: the bus has no DC metrics",
    "DCW": "the inverter's DC side: the bus has no DC metrics",
    "TmpSnk": "one temperature per device: the cabinet's (TmpCab)",
    "TmpTrns": "one temperature per device: the cabinet's (TmpCab)",
    "TmpOt": "one temperature per device: the cabinet's (TmpCab)",
}
_WHY: Final[dict[int, dict[str, str]]] = {
    101: {**_INVERTER_WHY, **dict.fromkeys(_PHASES_B_C, "phase B or C of a single-phase inverter")},
    103: _INVERTER_WHY,
    120: {
        "MaxChaRte": "a nameplate rating; max_charge_power is the limit now allowed (124 WChaMax)",
        "MaxDisChaRte": "a nameplate rating; max_discharge_power is the limit now allowed",
    },
    124: {
        "InWRte": "a percent of WChaMax: no canonical metric (max_charge_power is WChaMax)",
        "OutWRte": "a percent of a discharge reference SunSpec does not name: verify per device",
    },
    802: {
        "V": "the battery's DC side: voltage, current and active_power are the AC side's",
        "A": "the battery's DC side: voltage, current and active_power are the AC side's",
        "W": "the battery's DC side: voltage, current and active_power are the AC side's",
        "WChaRteMax": "a nameplate rating (DC), not the limit now allowed",
        "WDisChaRteMax": "a nameplate rating (DC), not the limit now allowed",
    },
}


def _model(model_id: int, name: str, label: str, length: int, points: Iterable[Point]) -> Model:
    about = _ABOUT.get(model_id, _ABOUT[103] if model_id == 101 else {})
    canonical = _CANONICAL.get(model_id, {})
    built = []
    for point in points:
        fits = canonical.get(point.name)
        point = point._replace(description=about.get(point.name, ""))
        if fits is not None:
            point = point._replace(
                metric=fits.metric, unit=fits.unit, scale=fits.scale, range=fits.range
            )
        built.append(point)
    return Model(model_id, name, label, length, tuple(built))


# Model 101 has model 103's layout; phases B and C are optional in it.
_M101: Final = tuple(p._replace(mandatory=False) if p.name in _PHASES_B_C else p for p in _M103)

MODELS: Final[Mapping[int, Model]] = MappingProxyType(
    {
        1: _model(1, "common", "Common", 66, _M1),
        101: _model(101, "inverter_single_phase", "Inverter (Single Phase)", 50, _M101),
        103: _model(103, "inverter_three_phase", "Inverter (Three Phase)", 50, _M103),
        120: _model(120, "nameplate", "Nameplate", 26, _M120),
        121: _model(121, "settings", "Basic Settings", 30, _M121),
        122: _model(122, "status", "Measurements_Status", 44, _M122),
        123: _model(123, "controls", "Immediate Controls", 24, _M123),
        124: _model(124, "storage_basic", "Storage", 24, _M124),
        802: _model(802, "battery", "Battery Base Model", 62, _M802),
    }
)
"""The models energybus knows, by ID."""


def model_name(model_id: int) -> str | None:
    """SunSpec's name of a model energybus knows (``inverter_three_phase``), else ``None``."""
    model = MODELS.get(model_id)
    return model.name if model is not None else None


def decode_string(words: Sequence[int]) -> str:
    """A SunSpec string: two characters per register, high byte first, padded with NULs
    (text ends at the first NUL; trailing blanks, which some devices pad with, go too)."""
    if any(not 0 <= word <= 0xFFFF for word in words):
        raise ValueError("a register holds 0..65535")
    raw = b"".join(word.to_bytes(2, "big") for word in words)
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").rstrip()


# The register map --------------------------------------------------------------------

_Value = str | int | float | bool | tuple[float, float]


def device_map(
    models: list[FoundModel], *, name: str, unit_id: int, entity_type: str, note: str = ""
) -> str:
    """The text of a register map (``mappings/modbus`` schema) for a device whose scan
    found ``models``; ``note`` (where and when it was scanned) goes into its comments.

    Raises :class:`ValueError` for an unknown entity type or unit id, and when no model
    found has a point with a canonical metric (a map needs one register at least).
    """
    if entity_type not in ENTITY_TYPES:
        raise ValueError(f"no entity type {entity_type!r}; known: {', '.join(ENTITY_TYPES)}")
    if not 0 <= unit_id <= 255:
        raise ValueError(f"unit id {unit_id} is not 0..255")
    sections: list[str] = []
    ignore: dict[str, str] = {}
    owners: dict[str, str] = {}  # metric -> the register that gives it (first model found)
    seen: Counter[int] = Counter()
    chain: list[str] = []
    preferred = _preferred(models)
    for found in models:
        seen[found.model_id] += 1
        count = seen[found.model_id]
        prefix = f"m{found.model_id}" if count == 1 else f"m{found.model_id}_{count}"
        model = MODELS.get(found.model_id)
        known = model.name if model is not None else "unknown"
        chain.append(f"{found.model_id} {known} at {found.address} (L = {found.length})")
        if model is None:
            ignore[prefix] = (
                f"model {found.model_id} at {found.address} (L = {found.length}):"
                " not in energybus's SunSpec tables"
            )
            continue
        sections += _lay_out(model, found, prefix, owners, ignore, preferred)
    if not owners:
        ids = ", ".join(str(m.model_id) for m in models) or "none"
        raise ValueError(
            f"no model found (models {ids}) has a point with a canonical energybus metric"
        )
    ids = ", ".join(str(m.model_id) for m in models)
    description = f"{name}: a SunSpec device with models {ids} (energybus modbus scan)"
    lines = [
        f"# {_comment(name)}: the register map of a SunSpec device, written by",
        "# `energybus modbus scan` from the models the device lists:",
        *(f"#   {entry}" for entry in chain),
    ]
    if note:
        lines.append(f"# {_comment(note)}")
    lines += [
        "# Each register is a SunSpec point: its address is the model's ID register plus the",
        "# point's offset. Points not published are under [ignore], with the reason. SunSpec",
        "# does not state the sign of W for storage: check active_power against the device.",
        "",
        'adapter = "modbus"',
        f"description = {_string(description)}",
        "",
        "[document]",
        'title = "SunSpec Information Models (JSON model definitions)"',
        f"version = {_string(SOURCE_VERSION)}",
        f"url = {_string(SOURCE_URL)}",
        "",
        "[defaults]",
        'profile = "A"',
        "dedupe = true",
        "max_interval_s = 60",
        "",
        "[device]",
        f"entity_type = {_string(entity_type)}",
        f"unit_id = {unit_id}",
        'table = "holding"',
        "max_registers = 125",
        "",
        *sections,
        "[ignore]",
        *(f"{key} = {_string(reason)}" for key, reason in ignore.items()),
    ]
    return "\n".join(lines) + "\n"


def _preferred(models: list[FoundModel]) -> dict[str, str]:
    """For each metric, the register that gives it: a mandatory point before an optional
    one, then the first model found."""
    best: dict[str, tuple[bool, int, str]] = {}
    seen: Counter[int] = Counter()
    for order, found in enumerate(models):
        seen[found.model_id] += 1
        count = seen[found.model_id]
        prefix = f"m{found.model_id}" if count == 1 else f"m{found.model_id}_{count}"
        model = MODELS.get(found.model_id)
        if model is None:
            continue
        end = found.length + 2
        present = {p.name for p in model.points if p.offset + p.size <= end}
        for point in model.points:
            if point.metric is None or point.name not in present:
                continue
            if point.sf is not None and point.sf not in present:
                continue
            rank = (not point.mandatory, order, _register(prefix, point))
            if point.metric not in best or rank < best[point.metric]:
                best[point.metric] = rank
    return {metric: rank[2] for metric, rank in best.items()}


def _lay_out(
    model: Model,
    found: FoundModel,
    prefix: str,
    owners: dict[str, str],
    ignore: dict[str, str],
    preferred: dict[str, str],
) -> list[str]:
    """The register sections of one model found; its unmapped points go to ``ignore``."""
    end = found.length + 2  # the registers of this instance, from its ID register
    present = {p.name for p in model.points if p.offset + p.size <= end}
    why = _WHY.get(model.id, {})
    reasons: dict[str, str] = {}
    mapped: set[str] = set()
    for point in model.points:
        if point.name not in present:
            reasons[point.name] = (
                f"past the end of this device's model {model.id} (L = {found.length})"
            )
        elif point.metric is None:
            continue
        elif point.sf is not None and point.sf not in present:
            reasons[point.name] = f"its scale factor {point.sf} is past the end of the model"
        elif preferred.get(point.metric) != _register(prefix, point):
            reasons[point.name] = (
                f"gives {point.metric}, which {preferred[point.metric]} gives"
                " (a mandatory point before an optional one, then the first model found)"
            )
        else:
            owners[point.metric] = _register(prefix, point)
            mapped.add(point.name)
    scales = {p.sf for p in model.points if p.name in mapped and p.sf is not None}
    lines = [
        f"# Model {model.id} {model.name} ({model.label}) at {found.address}, L = {found.length}",
        "",
    ]
    for point in model.points:
        register = _register(prefix, point)
        if point.name in mapped or point.name in scales:
            lines += _section(model, found, prefix, point, register)
        else:
            ignore[register] = reasons.get(point.name) or why.get(point.name) or _reason(point)
    return lines if len(lines) > 2 else []


def _section(
    model: Model, found: FoundModel, prefix: str, point: Point, register: str
) -> list[str]:
    fields: list[tuple[str, _Value]] = [
        ("address", found.address + point.offset),
        ("doc_address", f"{model.id}:{point.name} (offset {point.offset})"),
        ("data_type", point.type),
    ]
    if point.metric is not None:
        fields.append(("metric", point.metric))
        if point.unit is not None:
            fields.append(("unit", point.unit))
        if point.scale != 1.0:
            fields.append(("scale", point.scale))
        if point.sf is not None:
            fields.append(("scale_register", _register(prefix, _point(model, point.sf))))
        if point.range is not None:
            fields.append(("range", point.range))
    text = point.description or "Scale factor"
    if point.metric is not None and point.access == "RW":
        # Read only until a person gives it limits: a scanned device's ratings are not a
        # safety review, and a writable register needs min and max.
        text += "; writable on the device: add writable = true and limits to command it"
    fields.append(("description", f"{text} (SunSpec {model.id} {point.name})"))
    return [
        f"[registers.{register}]",
        *(f"{key} = {_toml(value)}" for key, value in fields),
        "",
    ]


def _reason(point: Point) -> str:
    if point.name in ("ID", "L"):
        return "the model's header (ID and length): the scan reads it"
    if point.type == "pad":
        return "padding"
    if point.type == "string":
        return f"{point.description}: text, not a number"
    if point.type == "sunssf":
        return "scales points that are not mapped"
    what = point.description or point.name
    if point.units:
        what += f" ({point.units})"
    if point.access == "RW":
        return f"{what}: a setting with no canonical energybus metric"
    return f"{what}: no canonical energybus metric"


def _point(model: Model, name: str) -> Point:
    return next(p for p in model.points if p.name == name)


def _register(prefix: str, point: Point) -> str:
    """``m103_w_sf``: the model (and instance) and the point's name in lower case, which
    keeps SunSpec's name recognisable."""
    return f"{prefix}_{point.name.lower()}"


def _toml(value: _Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, tuple):
        return f"[{', '.join(repr(float(v)) for v in value)}]"
    return repr(value)


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML escapes DEL too."""
    return json.dumps(text).replace("\x7f", "\\u007f")


def _comment(text: str) -> str:
    return " ".join(text.split())
