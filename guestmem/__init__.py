"""Guest physical memory shared by the simulated guest and the device: regions, bounds, dirty log."""
from guestmem.dirty import DirtyLog
from guestmem.memory import GuestMemory, GuestMemoryError, Region
from guestmem.pages import POISON, ZERO, PageVersions
from guestmem.units import PAGE_SHIFT, PAGE_SIZE, CmdId, Gpa, PageCount, Pfn, QueueIndex

__all__ = ["DirtyLog", "GuestMemory", "GuestMemoryError", "Region", "PageVersions", "ZERO",
           "POISON", "PAGE_SHIFT", "PAGE_SIZE", "Gpa", "Pfn", "PageCount", "QueueIndex", "CmdId"]
