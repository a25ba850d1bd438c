"""The torch thread count of a CPU training run, chosen by timing the run's own first steps.

Whether more threads help depends on the machine and on the moment: a 2-vCPU VM may give two real cores
(2 threads nearly twice as fast as one on the harness's TopK step, BENCHMARKS.md) or two hyperthreads of a core that a
neighbour also loads, where a second thread slows many ops down. So with `train.threads` unset, a CPU run
takes its thread count from a probe: the candidates are 1, 2, 4, … up to torch's setting, each runs one
warm-up step (first-call kernel probes, allocation) and then `ROUNDS` timed steps, taken in turns so that a
slow spell of the machine hits every candidate alike; the fastest (best time) is kept for the rest of the
run. The probe steps are the run's own training steps: nothing is repeated or thrown away.

The choice is kept in the checkpoint (a resumed run keeps it) and in the run's summary. Thread counts can
change fp32 summation order, so a run that must repeat another bit for bit sets `train.threads`.
"""

from __future__ import annotations

import math

import torch

#: timed steps per candidate (after its warm-up step)
ROUNDS = 2
#: a run probes only when it has at least this many times the probe's steps to go (a short run keeps torch's setting)
MIN_RUN_MULTIPLE = 4


def candidates(top: int) -> list[int]:
    """1, 2, 4, … below `top` (≥ 1), then `top`."""
    return [1 << i for i in range((top - 1).bit_length())] + [top]


class ThreadProbe:
    """The schedule of a thread probe over the next steps: `threads()` before each probe step, `record(s)`
    after it with its seconds; `chosen` is set once every candidate has run its rounds."""

    def __init__(self, top: int, rounds: int = ROUNDS):
        self.counts = candidates(top)
        self.schedule = [c for _ in range(rounds + 1) for c in self.counts]  # round 0: warm-up, not timed
        self.best = dict.fromkeys(self.counts, math.inf)
        self.done_steps = 0
        self.chosen: int | None = None

    def threads(self) -> int:
        return self.schedule[self.done_steps]

    def record(self, seconds: float) -> None:
        if self.done_steps >= len(self.counts):  # past the warm-up round
            count = self.schedule[self.done_steps]
            self.best[count] = min(self.best[count], seconds)
        self.done_steps += 1
        if self.done_steps == len(self.schedule):
            self.chosen = min(self.counts, key=lambda c: (self.best[c], c))  # a tie goes to fewer threads

    @classmethod
    def for_run(cls, requested: int | None, device: torch.device, steps_left: int, world_size: int) -> ThreadProbe | None:
        """The probe for a run, or None where the thread count is not ours to choose: `train.threads` set,
        not on CPU, torch already at 1 thread, several processes (torchrun sets each one's threads), or a
        run too short for the probe to pay."""
        top = torch.get_num_threads()
        if requested is not None or device.type != "cpu" or top <= 1 or world_size > 1:
            return None
        probe = cls(top)
        return probe if steps_left >= MIN_RUN_MULTIPLE * len(probe.schedule) else None
