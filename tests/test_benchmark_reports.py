"""Every benchmark script that writes a results JSON records the machine with it.

The README's rule: a time or speed is stated with the machine's CPU name and its f32 matmul
GFLOP/s measured in the same run. ``round_throughput.machine_info`` records the CPU name and
``round_throughput.matmul_peak`` the GFLOP/s; a script whose report lacks the second leaves its
times without the machine's speed (soak, data_scale, host_prefetch, fedbuff_vs_fedavg,
fairness_personalization, model_throughput and conv_in_scan did).
"""

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WRITES_RESULTS = re.compile(r"\bwrite_report\(|[\"']results[\"']")
RECORDS_CPU = re.compile(r"\b(machine_info|cpu_model)\(")
RECORDS_PEAK = re.compile(r"\bmatmul_peak\(")


def _report_scripts() -> list[Path]:
    # the peers' virtual environments (benchmarks/peers/.venv-*) hold other projects' code
    return [path for path in sorted(BENCHMARKS.rglob("*.py"))
            if not any(part.startswith(".venv") for part in path.relative_to(BENCHMARKS).parts)
            and WRITES_RESULTS.search(path.read_text())]


def test_every_results_writer_records_cpu_name_and_matmul_peak():
    scripts = _report_scripts()
    names = {path.name for path in scripts}
    # A direct count of the scripts the README cites for times, so the scan cannot pass empty.
    assert {"soak.py", "data_scale.py", "host_prefetch.py", "fedbuff_vs_fedavg.py",
            "fairness_personalization.py", "model_throughput.py", "conv_in_scan.py",
            "demos.py", "run_peers.py"} <= names, names
    missing = [f"{path.relative_to(BENCHMARKS)}: "
               + ", ".join(what for what, pattern in (("CPU name", RECORDS_CPU),
                                                      ("matmul GFLOP/s", RECORDS_PEAK))
                           if not pattern.search(path.read_text()))
               for path in scripts
               if not (RECORDS_CPU.search(path.read_text())
                       and RECORDS_PEAK.search(path.read_text()))]
    assert not missing, missing


RECORDS_COMMAND = re.compile(r"[\"']command[\"']\s*:")


def test_rerun_result_writers_record_their_command():
    # The README names the command behind each number; these scripts' reports carry it too, so a
    # JSON says how it was made (--model, --rounds, ... change the numbers, not the file prefix).
    scripts = {"fedbuff_vs_fedavg.py", "fairness_personalization.py", "model_throughput.py"}
    missing = [name for name in sorted(scripts)
               if not RECORDS_COMMAND.search((BENCHMARKS / name).read_text())]
    assert not missing, missing
