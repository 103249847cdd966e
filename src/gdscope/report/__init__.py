"""Reports on stored runs: verdicts (claim, prediction, measurement) and a self-contained HTML page.

from gdscope.report import summarize_run, write_report
verdicts = summarize_run(store, run_id)
write_report(store, [run_id], "report.html")
"""

from gdscope.report.html import write_report
from gdscope.report.summary import Verdict, summarize_run

__all__ = ["Verdict", "summarize_run", "write_report"]
