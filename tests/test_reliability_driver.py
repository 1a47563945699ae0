"""Driver for the interruption tests (no tests here): runs the real ``sinkhole`` CLI with one extra
scan step, ``gate``, placed right after the foundation's steps. When ``SINKHOLE_TEST_GATE`` names a
file, the gate step writes it and then waits, so the test can interrupt the scan (SIGINT or SIGKILL)
at a known point with finished steps behind it; otherwise the gate passes at once. Likewise
``SINKHOLE_TEST_SWEEP_GATE`` makes ``sinkhole sweep`` wait right after its first checkpoint.

    python tests/test_reliability_driver.py scan MODEL --out DIR ...
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    import sinkhole.scan_steps  # noqa: F401  the foundation's steps come first
    from sinkhole.cli import entry
    from sinkhole.scan import step

    @step("gate", "test gate (waits when SINKHOLE_TEST_GATE is set)")
    def _gate(ctx):
        flag = os.environ.get("SINKHOLE_TEST_GATE")
        if flag:
            with open(flag, "w") as f:
                f.write("reached\n")
            time.sleep(120)
        return {"passed": True, "finished_before": sorted(ctx.results)}

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
