"""The benchmark scripts run (their figures are for people to read, not for tests to check)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_cams_benchmark_prints_its_ratios_and_memory():
    result = subprocess.run(
        [sys.executable, str(BENCH / "cams.py"), "--images", "2", "--repeats", "1", "--memory", "3",
         "--threads", "1", "--workers", "0"],  # no DataLoader processes to start for a few images
        capture_output=True, text=True, timeout=300, check=True,
    )
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if "speed ratio" in line] == ["synthetic 96x96", "VOC-like mix"]
    assert any(line.startswith("peak host memory (RSS), batched extractor") and "3 images" in line for line in lines)


def test_the_gpu_benchmark_runs_in_its_cpu_smoke_mode_and_prints_one_json():
    result = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout)
    assert report["smoke"] and report["cams"]["speed_ratio"] > 0 and report["dense_energy"]["forward_backward_ms"] > 0
    assert set(report["training"]) == {f"{net}_amp_{amp}" for net in ("classifier", "segment") for amp in ("on", "off")}
    assert report["prune"]["img_per_s"] > 0 and report["prune_torch"]["img_per_s"] > 0
    assert report["refine_walk"]["img_per_s"] > 0
    assert all(report[name]["peak_gpu_mb"] is None for name in ("cams", "dense_energy", "prune", "prune_torch",
                                                                "refine_walk"))


def test_the_crf_benchmark_compares_the_backends_and_their_agreement():
    result = subprocess.run([sys.executable, str(BENCH / "crf.py"), "--small-images", "2", "--voc-images", "1",
                             "--processes", "1"], capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.splitlines()
    assert sum("backends agree on" in line for line in lines) == 2
    assert [line.split(":")[0] for line in lines if "torch / pydensecrf" in line] == ["96x96, 1 process(es)",
                                                                                      "500x375, 1 process(es)"]


def test_the_training_layout_benchmark_times_both_layouts_of_each_backbone():
    result = subprocess.run([sys.executable, str(BENCH / "train_layout.py"), "--steps", "1", "--rounds", "1"],
                            capture_output=True, text=True, timeout=300, check=True)
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[:2] for row in rows] == [[net, backbone] for net in ("classifier", "segment")
                                         for backbone in ("small", "mobilenet_v2")]
    assert all(float(row[-1]) > 0 for row in rows)


def test_the_end_to_end_benchmark_times_each_part_of_a_step_and_projects_the_schedule():
    result = subprocess.run([sys.executable, str(BENCH / "end_to_end.py"), "--backbone", "small", "--crop", "64",
                             "--batch", "2", "--steps", "1", "--workers", "1"],
                            capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.splitlines()
    assert "scales (1.0, 0.5, 1.5, 2.0)" in lines[1]
    parts = [line.strip().split(":")[0] for line in lines[2:-1]]
    assert parts == ["forward", "other scales (no gradient)", "dense CRFs (4 in 1 processes)",
                     "forward + losses + backward + step"]
    assert "20000 steps:" in lines[-1]


def test_the_refine_benchmark_compares_the_walk_with_its_dense_matrix():
    result = subprocess.run([sys.executable, str(BENCH / "refine.py"), "--images", "1", "--height", "60",
                             "--width", "80"], capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["walk", "dense"]
    assert "walk / dense" in lines[3] and "largest difference" in lines[4]
    assert float(lines[4].rsplit(" ", 1)[1]) < 1e-4
