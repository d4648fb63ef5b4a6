"""Guest physical memory shared by the simulated guest and the device.

Regions with bounds checks (``memory``), the migration dirty log (``dirty``), page contents as
versions (``pages``), simulated time (``clock``) and the typed units (``units``).
"""
from guestmem.dirty import DirtyLog
from guestmem.memory import GuestMemory, GuestMemoryError, Region
from guestmem.pages import POISON, ZERO, PageVersions
from guestmem.units import PAGE_SHIFT, PAGE_SIZE, CmdId, Gpa, PageCount, Pfn, QueueIndex

__all__ = ["DirtyLog", "GuestMemory", "GuestMemoryError", "Region", "PageVersions", "ZERO",
           "POISON", "PAGE_SHIFT", "PAGE_SIZE", "Gpa", "Pfn", "PageCount", "QueueIndex", "CmdId"]
