"""`--profile`: sample a Python proxy with py-spy while a phase runs, and name its hot spots.

py-spy attaches to the running process from outside (no code change, no restart), so the profile
is of exactly what the bench measures. Each phase leaves `profile-<target>-<phase>.txt` (collapsed
stacks: flamegraph.pl, speedscope.app and inferno read them) and a summary of the functions with
the most samples, by own time and by inclusive time.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from types import TracebackType

SAMPLES_PER_SECOND = 250
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class Profiler:
    """py-spy recording `pid` into `path` for the duration of a `with` block (a no-op without py-spy)."""

    def __init__(self, pid: int, path: Path) -> None:
        self.pid, self.path = pid, path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        binary = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
        if not Path(binary).exists():
            return self
        self.process = subprocess.Popen(
            [binary, "record", "--pid", str(self.pid), "--rate", str(SAMPLES_PER_SECOND), "--format", "raw",
             "--output", str(self.path), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def short(frame: str) -> str:
    """`function (path/to/module.py:12)` as `module.function`, with site-packages paths trimmed."""
    found = FRAME.match(frame)
    if not found:
        return frame
    path = found["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path.removesuffix('.py').replace('/', '.')}.{found['function']}"


def summarize(path: Path, top: int = 20) -> str:
    """The functions with the most samples: own (self) time and inclusive time, in % of samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"{path.name}: no profile (is py-spy installed? pip install -e '.[bench]')"
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [short(frame) for frame in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for function in set(frames):
            inclusive[function] += samples
    if not total:
        return f"{path.name}: no samples"
    out = [f"{path.name}: {total} samples"]
    out += ["  own time:"] + [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    out += ["  inclusive time:"]
    out += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top * 2)]
    return "\n".join(out)
