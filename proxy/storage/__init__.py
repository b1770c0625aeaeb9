"""Where server-side state lives. One interface (`Storage`), one implementation per backend."""

from proxy.storage.base import SessionRecord, Storage
from proxy.storage.memory import MemoryStorage


def open_storage(url: str) -> Storage:
    if url == "memory://":
        return MemoryStorage()
    raise ValueError(f"unsupported storage URL scheme in {url.split(':', 1)[0]!r}")


__all__ = ["MemoryStorage", "SessionRecord", "Storage", "open_storage"]
