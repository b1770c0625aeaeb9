"""Runs: a relayed generation that outlives its connection (proxy/runs/run.py), the runs of this
process (manager.py), the responses that follow a run's log (follower.py), and how runs end
(ending.py). docs/architecture.md walks through them."""

from proxy.runs.ending import Ending
from proxy.runs.follower import DisconnectWatch, RunStream
from proxy.runs.manager import RunManager, RunSettings
from proxy.runs.run import Run, RunRequest

__all__ = ["DisconnectWatch", "Ending", "Run", "RunManager", "RunRequest", "RunSettings", "RunStream"]
