"""Every script under benchmarks/ runs its `--smoke` mode (seconds, the real code path) as a subprocess, so that
no benchmark rots unnoticed. The slower ones are marked slow; timings are never checked here."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

# script: (arguments, a text its output must hold, slow); "{out}" becomes a fresh temporary folder
SMOKE = {
    "ctm_speed.py": (["--smoke"], "fwd+bwd", False),
    "ctm_mazes.py": (["--smoke"], "generate 50 mazes", False),
    "matrix.py": (["--smoke", "--out", "{out}"], "2 fitting pairs", False),
    "neuroformer_speed.py": (["--smoke", "--threads", "1"], "identical tokens: True", False),
    "ccrnn.py": (["--smoke", "--out", "{out}"], "gap closed", True),
    "cli_startup.py": (["--smoke"], "slowest light command", True),
    "dendrites.py": (["overhead", "--smoke"], "ours k=3", True),
    "ncap_navigate.py": (["--smoke", "--plot", "{out}/paths.png"], "NCAP navigation", True),
    "neurogym_tasks.py": (["--smoke", "--out", "{out}"], "GoNogo-v0 lstm: decision", True),
    "neuroformer.py": (["--smoke", "--out", "{out}"], "rate r:", True),
    "swimmer_learning.py": (["run", "--smoke", "--out", "{out}/run.json"], "transfer of the 6-link", True),
    "swimmer_throughput.py": (["--smoke"], "ratio 8 sync vector envs", True),
    "taugate_protocol.py": (["--smoke", "--out", "{out}"], "wrote", True),
}


def test_every_benchmark_has_a_smoke_case() -> None:
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(SMOKE)


@pytest.mark.parametrize("script", [pytest.param(name, marks=pytest.mark.slow) if slow else name
                                    for name, (_, _, slow) in SMOKE.items()])
def test_smoke(script: str, tmp_path: Path) -> None:
    args, expected, _ = SMOKE[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *(a.format(out=tmp_path) for a in args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout, proc.stdout[-3000:]


def test_ctm_speed_wrong_official_path_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", ["ctm_speed.py", "--smoke", "--official-path", str(tmp_path / "wrong")])
    with pytest.raises(SystemExit) as raised:
        runpy.run_path(str(BENCHMARKS / "ctm_speed.py"), run_name="__main__")
    message = str(raised.value.code)
    assert "--official-path" in message and "continuous-thought-machines" in message and "\n" not in message
