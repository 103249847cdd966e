"""Experiment configs (validation by field path, --set parsing, hashing) and the store's
experiment rows (one transaction with their runs; UNIQUE per sweep point)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from gdscope.errors import ConfigError, StoreError
from gdscope.experiments.config import build, config_hash, merge, parse_assignments, to_dict
from gdscope.store import MetricRow, Store


@dataclass(frozen=True)
class Data:
    name: str = "digits"
    n: int | None = 64


@dataclass(frozen=True)
class Cfg:
    widths: tuple[int, ...] = (8, 16)
    lr: float = 0.1
    kind: Literal["a", "b"] = "a"
    flag: bool = False
    data: Data = field(default_factory=Data)
    extra: dict = field(default_factory=dict)


def test_build_converts_and_validates_by_field_path():
    cfg = build(Cfg, {"widths": [4, 5], "lr": 1, "data": {"n": None}, "kind": "b"})
    assert cfg.widths == (4, 5) and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.data == Data("digits", None) and cfg.kind == "b"
    cases = [
        ({"widths": [4, "x"]}, "widths[1]: expected an integer"),
        ({"lr": "fast"}, "lr: expected a number"),
        ({"flag": 1}, "flag: expected true or false"),
        ({"kind": "c"}, "kind: 'c' is not allowed"),
        ({"data": {"n": 2.5}}, "data.n"),
        ({"data": {"size": 3}}, "data.size: unknown field"),
        ({"lrr": 0.1}, "lrr: unknown field"),
        ({"widths": [True]}, "widths[0]: expected an integer"),
        ({"data": 3}, "data: expected a table"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build(Cfg, data)


def test_assignments_merge_and_hash():
    over = parse_assignments(["data.n=32", "widths=[1, 2]", "data.name=mnist1d", "lr=1e-2"])
    assert over == {"data": {"n": 32, "name": "mnist1d"}, "widths": [1, 2], "lr": 0.01}
    merged = merge({"data": {"n": 8, "name": "digits"}, "lr": 0.5}, over)
    cfg = build(Cfg, merged)
    assert cfg.data == Data("mnist1d", 32) and cfg.widths == (1, 2)
    # same config, different spelling: same hash; any change: a different hash
    assert config_hash(cfg) == config_hash(build(Cfg, {**merged, "lr": 0.01}))
    assert config_hash(cfg) != config_hash(build(Cfg, {**merged, "lr": 0.02}))
    assert to_dict(cfg)["widths"] == [1, 2]
    for bad in ("noequals", "=3", "a..b=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_assignments([bad])


def _payload(tmp_path):
    with Store(tmp_path / "worker.db") as s:
        rid = s.create_run("r", {"lr": 0.1})
        s.log_step(rid, 0, [MetricRow("loss", 1.0), MetricRow("acc", float("nan"))])
        s.log_step(rid, 1, [MetricRow("loss", 0.5, iterate="after")])
        s.add_artifact(rid, "blob", b"\x00\x01", "application/octet-stream")
        s.finish_run(rid, "completed", {"note": 1})
        return s.export_run(rid)


def test_experiment_rows_import_runs_atomically_and_once_per_sweep_point(tmp_path):
    payload = _payload(tmp_path)
    with Store(tmp_path / "main.db") as s:
        args = dict(status="completed", verdicts=[{"claim": "c"}], results=[{"x": 1.5}], figures=[])
        eid = s.add_experiment("exp", {"a": 1}, "h1", runs=[payload, payload], sweep="sw", **args)
        assert eid is not None
        info = s.experiment(eid)
        assert info.results == [{"x": 1.5}] and len(info.run_ids) == 2 and info.sweep == "sw"
        run = s.run(info.run_ids[0])
        assert run.status == "completed" and run.summary == {"note": 1}
        assert s.series(run.id, "loss")[1].tolist() == [1.0, 0.5]
        assert s.artifact(run.id, "blob") == b"\x00\x01"
        # a retried point is not stored twice, and nothing of it is written
        runs_before = len(s.runs())
        assert s.add_experiment("exp", {"a": 1}, "h1", runs=[payload], sweep="sw", **args) is None
        assert len(s.runs()) == runs_before and s.sweep_hashes("sw") == {"h1"}
        # a failure inside the transaction leaves no experiment row and no runs
        broken = {**payload, "metrics": [(0, "loss", 1.0, "", "before")] * 2}  # duplicate key
        with pytest.raises(StoreError, match="UNIQUE"):
            s.add_experiment("exp", {"a": 2}, "h2", runs=[broken], sweep="sw", **args)
        assert len(s.runs()) == runs_before and s.sweep_hashes("sw") == {"h1"}
        # outside a sweep, the same config may be run again
        assert s.add_experiment("exp", {"a": 1}, "h1", **args) is not None
        assert s.add_experiment("exp", {"a": 1}, "h1", **args) is not None
        assert len(s.experiments()) == 3 and len(s.experiments("sw")) == 1
