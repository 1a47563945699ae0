"""Driver for the interruption tests (no tests here): runs the real ``sinkhole`` CLI with one extra
scan step, ``gate``, placed right after the foundation's steps. When ``SINKHOLE_TEST_GATE`` names a
file, the gate step writes it and then waits, so the test can interrupt the scan (SIGINT or SIGKILL)
at a known point with finished steps behind it; otherwise the gate passes at once. Likewise
``SINKHOLE_TEST_SWEEP_GATE`` makes ``sinkhole sweep`` wait right after its first checkpoint.

    python tests/driver_reliability.py scan MODEL --out DIR ...
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    from dataclasses import dataclass

    import sinkhole.pipeline.registry as scan_steps
    from sinkhole.cli import entry
    from sinkhole.results import StepResult
    from sinkhole.pipeline.engine import Step, pipeline

    @dataclass
    class Gate(StepResult):
        passed: bool
        finished_before: list

    def _gate(ctx):
        flag = os.environ.get("SINKHOLE_TEST_GATE")
        if flag:
            with open(flag, "w") as f:
                f.write("reached\n")
            time.sleep(120)
        return Gate(True, sorted(ctx.results))

    steps = list(scan_steps.PIPELINE)
    at = [s.name for s in steps].index("layer_norms") + 1  # right after the foundation's steps
    scan_steps.PIPELINE = pipeline(steps[:at] + [Step("gate", _gate, "test gate (waits when SINKHOLE_TEST_GATE "
                                                      "is set)", Gate)] + steps[at:])

    sweep_flag = os.environ.get("SINKHOLE_TEST_SWEEP_GATE")
    if sweep_flag:  # wait right after the sweep's first checkpoint (one batch finished)
        import sinkhole.attack.sweep as sw

        real_write = sw.write_json

        def gated_write(path, obj):
            real_write(path, obj)
            with open(sweep_flag, "w") as f:
                f.write("reached\n")
            time.sleep(120)

        sw.write_json = gated_write

    sys.argv[0] = "sinkhole"
    entry()


if __name__ == "__main__":
    main()
