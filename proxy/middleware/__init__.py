"""Pure-ASGI middleware: each wraps `send`/`receive` and never buffers a streaming body."""
