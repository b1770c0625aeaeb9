"""Stream encoders: how relayed upstream text is framed for the browser, one module per protocol."""

from proxy.protocols.base import StreamEncoder
from proxy.protocols.text import TextEncoder

__all__ = ["StreamEncoder", "TextEncoder"]
