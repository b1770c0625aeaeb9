"""Stream encoders: how relayed upstream text is framed for the browser, one module per protocol."""

from proxy.protocols.base import StreamEncoder
from proxy.protocols.data import DataStreamEncoder
from proxy.protocols.text import TextEncoder
from proxy.protocols.ui import UiMessageStreamEncoder

__all__ = ["DataStreamEncoder", "StreamEncoder", "TextEncoder", "UiMessageStreamEncoder"]
