"""The README's first quick-start command: the demo runs a real training end to end."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_trains_federated_and_saves_the_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fl_client.demo", "--rounds", "2", "--clients", "3", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = re.findall(r"round +(\d+): global test accuracy ([0-9.]+)", result.stdout)
    assert [int(number) for number, _ in rounds] == [0, 1, 2]
    assert float(rounds[-1][1]) > float(rounds[0][1]) + 0.3  # it learned
    locals_ = [float(v) for v in re.findall(r"client \d: test accuracy ([0-9.]+)", result.stdout)]
    assert len(locals_) == 3
    plot = tmp_path / "accuracy.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
