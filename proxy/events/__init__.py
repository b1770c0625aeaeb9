"""Run events for the app (CONTRACT C5, docs/events.md): when a run ends, a signed JSON event is
POSTed to `BFF_EVENTS_URL`, so the app can keep the conversation or bill its users.

- payload.py: what the event says (`RunEnded`, the `run.ended` body);
- signing.py: the Standard Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`);
- delivery.py: the hand-off from the run (never waits), the outbox in the storage, and the workers
  that deliver, retry with backoff and give up.
"""

from proxy.events.delivery import DeliverySettings, RunEvents
from proxy.events.payload import RunEnded
from proxy.events.signing import signed_headers, webhook_key

__all__ = ["DeliverySettings", "RunEnded", "RunEvents", "signed_headers", "webhook_key"]
