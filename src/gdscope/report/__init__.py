"""Reports on stored runs: verdicts (claim, prediction, measurement) and a self-contained HTML page.

from gdscope.report import summarize_run, write_report
verdicts = summarize_run(store, run_id)
write_report(store, [run_id], "report.html")
write_experiment_report(store, experiment_id, "report.html")   # a stored experiment
write_sweep_report(store, sweep_name, "sweep.html")            # every point of a sweep
"""

from gdscope.report.experiment import write_experiment_report, write_sweep_report
from gdscope.report.html import write_report
from gdscope.report.summary import Verdict, summarize_run

__all__ = [
    "Verdict",
    "summarize_run",
    "write_experiment_report",
    "write_report",
    "write_sweep_report",
]
