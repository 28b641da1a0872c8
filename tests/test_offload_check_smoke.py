"""benchmarks/offload_check.py (step 2 of benchmarks/device_check.sh) runs on the CPU with the tiny config."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_offload_check_runs_and_reports(tmp_path):
    out = tmp_path / "offload.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "offload_check.py"), "--config", "tiny",
                          "--device", "cpu", "--layers", "2", "--slots", "3", "--tokens", "4", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[offload] cpu: 2 layers, 3 slots (per-layer): hit rate ")
    result = json.loads(out.read_text())
    assert result["tokens"] == 4 and 0.0 <= result["hit_rate"] <= 1.0 and result["tokens_per_s"] > 0
    assert result["bytes_per_token"] > 0          # 3 slots for 2 layers x 2 experts per token: something is copied
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")]).returncode == 0
