"""The anchor of `benchmarks/control_loop.py` (a): the plainest fixed-rate loop Python can write.

    python benchmarks/bare_loop.py PERIOD_S SECONDS PRIORITY

No torch, no package code, nothing to do on a tick: sleep until 0.5 ms before each deadline, then spin (as the
package's MonotonicClock does), under SCHED_FIFO PRIORITY when it is > 0. Prints each tick's lateness (s) on one
line. Its lateness is what the machine gives any loop at that rate and priority.
"""

import os
import sys
import time

period, seconds, prio = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
if prio:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
t0 = time.perf_counter() + period
late = []
for k in range(int(seconds / period)):
    due = t0 + k * period
    while True:
        left = due - time.perf_counter()
        if left <= 0:
            break
        if left > 5e-4:
            time.sleep(left - 5e-4)
    late.append(time.perf_counter() - due)
print(" ".join(repr(x) for x in late))
