"""netmemfs: networked memory a Linux process can map.

The path of a page, top to bottom: the doors (FUSE mount, userfaultfd regions,
/dev/netmem) -> journal.py -> remote.py -> protocol.py -> the server (netmemfs_server).
errors.py and pages.py sit under all of them.
"""

__version__ = "0.1.0"

from netmemfs.locking import commit_if, lock, version

__all__ = ["commit_if", "lock", "version"]
