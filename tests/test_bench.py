"""The benchmark scripts run (their figures are for people to read, not for tests to check)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_cams_benchmark_prints_its_ratios_and_memory():
    result = subprocess.run(
        [sys.executable, str(BENCH / "cams.py"), "--images", "2", "--repeats", "1", "--memory", "3",
         "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if "speed ratio" in line] == ["synthetic 96x96", "VOC-like mix"]
    assert any(line.startswith("peak host memory (RSS), batched extractor") and "3 images" in line for line in lines)
