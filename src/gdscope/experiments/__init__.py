"""Experiments that test each claim of global-convergence theory on real data.

    exp, cfg = resolve("width", ["widths=[32, 64]"])
    outputs = run_tasks(exp, cfg)
    judgement = exp.judge(cfg, [o.result for o in outputs])

Most users call :func:`gdscope.run_experiment` or ``gdscope run NAME``, which also store the
runs and write ``verdict.json`` and ``report.html``.
"""

from gdscope.experiments.base import (
    DataConfig,
    Executor,
    Experiment,
    ExperimentConfig,
    Figure,
    Judgement,
    SerialExecutor,
    TaskContext,
    TaskOutput,
    execute_task,
    experiment_names,
    get_experiment,
    register,
    resolve,
    run_tasks,
)
from gdscope.experiments.config import build, config_hash, load_toml, parse_assignments, to_dict

__all__ = [
    # running
    "resolve",
    "run_tasks",
    "execute_task",
    "experiment_names",
    "get_experiment",
    "Executor",
    "SerialExecutor",
    # writing an experiment
    "Experiment",
    "ExperimentConfig",
    "DataConfig",
    "TaskContext",
    "TaskOutput",
    "Judgement",
    "Figure",
    "register",
    # configs
    "build",
    "config_hash",
    "load_toml",
    "parse_assignments",
    "to_dict",
]
