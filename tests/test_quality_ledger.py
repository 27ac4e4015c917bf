"""The quality protocol's ledger: a run is reused only under its own key, and never retrained."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from bench.quality import (
    FEDERATIONS,
    PROTOCOL_TEACHERS,
    Plan,
    _spec,
    federation_jobs,
    ledger_status,
    prepare_data,
    protocol_teacher_directories,
    run_once,
    start_final_runs,
    tune_cell,
)
from bench.quality_ledger import LEDGER, read_record, record_path, run_key, write_record
from bench.quality_protocol import QUICK_GRID, Budget, Cell, settings_for
from cdfkd.student_node.config import Method, StudentKind
from cdfkd.teacher_node.package import read_metadata, weights_digest

SPLIT = {"validation_samples": 5000, "validation_seed": 18, "test_samples": None}
TRAIN = {"method": "cdfkd_mfs", "seed": 0, "optimizer": {"student_lr": 0.1}}
FIGURES = {"seed": 0, "accuracy": 0.5, "iterations": 3}


def test_the_key_changes_with_what_decides_the_result() -> None:
    base = run_key(TRAIN, SPLIT, "validation", ["a", "b"])
    assert base == run_key(json.loads(json.dumps(TRAIN)), dict(reversed(SPLIT.items())),
                           "validation", ["a", "b"])  # fmt: skip
    changed = [
        run_key({**TRAIN, "seed": 1}, SPLIT, "validation", ["a", "b"]),
        run_key(TRAIN, {**SPLIT, "validation_samples": 500}, "validation", ["a", "b"]),
        run_key(TRAIN, SPLIT, "test", ["a", "b"]),
        run_key(TRAIN, SPLIT, "validation", ["b", "a"]),  # another teacher order
        run_key(TRAIN, SPLIT, "validation", ["a", "c"]),  # another teacher
    ]
    assert len({base, *changed}) == 6


def test_a_record_is_read_only_under_its_own_key(tmp_path: Path) -> None:
    path = record_path(tmp_path, "homogeneous", "tune", "cdfkd_mfs/mfs", "slr0.1", 0)
    assert path == tmp_path / "homogeneous/tune/cdfkd_mfs__mfs/slr0.1_seed0.json"
    assert read_record(path, "k") is None
    write_record(path, "k", {**FIGURES, "reused": False}, threads=1)
    assert read_record(path, "k") == FIGURES  # "reused" is the reader's, not the record's
    assert read_record(path, "other") is None
    record = json.loads(path.read_text())
    assert record["host"]["threads"] == 1
    assert record["host"]["processor"]
    assert not list(tmp_path.rglob("*.partial"))


def test_the_committed_teachers_are_the_weights_their_metadata_names() -> None:
    """Every session distills from these files, so they must be whole and named by their job."""
    packages = sorted(p for p in PROTOCOL_TEACHERS.iterdir() if p.is_dir())
    assert packages, "bench/quality_teachers is empty"
    for package in packages:
        metadata = read_metadata(package)
        assert weights_digest(package / "weights.safetensors") == metadata.weights_sha256
    expected = set()
    for federation in FEDERATIONS:
        jobs = federation_jobs(federation, 6, Path("unused"))
        expected |= set(protocol_teacher_directories(PROTOCOL_TEACHERS, jobs, SPLIT))
    assert set(packages) == expected


def test_the_committed_ledger_records_are_whole() -> None:
    for path in LEDGER.rglob("*.json"):
        record = json.loads(path.read_text())
        assert len(record["key"]) == 64
        assert 0.0 <= record["figures"]["accuracy"] <= 1.0
        assert record["figures"]["iterations"] > 0


def _record_then_read(tmp: str) -> None:
    """The Ray part of the test below, in a child process of its own (Ray and gRPC threads
    then end with that process, not with pytest's): results as JSON in ``tmp/result.json``."""
    import ray

    tmp_path = Path(tmp)
    data = prepare_data(tmp_path / "data", validation_samples=300, test_samples=100)
    split = json.loads((tmp_path / "data" / "split.json").read_text())
    jobs = federation_jobs("homogeneous", 6, data.owners)
    packages = protocol_teacher_directories(PROTOCOL_TEACHERS, jobs, SPLIT)
    base = {"batch_size": 16, "generator": {"latent_dim": 16, "width": 4}}
    base |= {"attention": {"samples": 10}}
    cell = Cell(Method.KD_REAL, StudentKind.SIMPLE_MULTI_HEADER)

    def plan(out: Path) -> Plan:
        return Plan(
            out=out,
            data=data,
            grid=QUICK_GRID,
            tune_budget=Budget(2, 1),
            final_budget=Budget(2, 1),
            seeds=(0,),
            reuse=True,
            base=base,
            threads=1,
            ledger=tmp_path / "ledger",
            split=split,
        )

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        first_setting, first = tune_cell(plan(tmp_path / "first"), "homogeneous", cell, packages)
        records_after_first = len(list((tmp_path / "ledger").rglob("*.json")))
        # Final seeds as Ray tasks, queued while the next tuning goes on: each records itself,
        # and the results come back in the seeds' order.
        first_plan = plan(tmp_path / "first")
        specs = [
            _spec(first_plan, "homogeneous", "final", cell, first_setting, s, packages)
            for s in (1, 0)
        ]
        wait_for_finals = start_final_runs(specs, threads=1, parallel=2)
        second_setting, second = tune_cell(plan(tmp_path / "second"), "homogeneous", cell, packages)
        finals = wait_for_finals()
    finally:
        ray.shutdown()
    (record,) = (tmp_path / "ledger" / "homogeneous" / "tune").rglob("*.json")
    reread = run_once({"record": str(record), "key": json.loads(record.read_text())["key"],
                       "reuse": True, "out": str(tmp_path / "nowhere"), "threads": 1,
                       "data": str(data.validation), "teachers": [str(p) for p in packages],
                       "train": {}})  # fmt: skip
    result = {
        "records_after_first": records_after_first,
        "first_setting": first_setting.to_json(),
        "second_setting": second_setting.to_json(),
        "first": first,
        "second": second,
        "finals": finals,
        "record": str(record),
        "reread": reread,
    }
    (tmp_path / "result.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_a_second_protocol_run_reads_the_ledger_and_trains_nothing(tmp_path: Path) -> None:
    """Real Ray Tune trials on the committed teachers: the first run records, the second reads."""
    child = multiprocessing.get_context("spawn").Process(
        target=_record_then_read, args=(str(tmp_path),)
    )
    child.start()
    child.join(timeout=600)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the protocol's child process ran past 600 s")
    result = json.loads((tmp_path / "result.json").read_text())  # written only if it got there
    assert result["records_after_first"] == 1
    assert (tmp_path / "first" / "runs").is_dir()
    finals = result["finals"]
    assert [run["seed"] for run in finals] == [1, 0]
    assert not any(run["reused"] for run in finals)
    assert len(list((tmp_path / "ledger" / "homogeneous" / "final").rglob("*.json"))) == 2
    assert result["second_setting"] == result["first_setting"]
    assert result["second"] == result["first"]
    assert not (tmp_path / "second" / "runs").exists()  # nothing trained the second time
    # The record holds the trial's real figures: a run of the same spec reads them back.
    figures = json.loads(Path(result["record"]).read_text())["figures"]
    assert figures["iterations"] == 2
    assert figures["accuracy"] == result["first"][0]["validation_accuracy"]
    assert result["reread"]["reused"]
    assert result["reread"]["accuracy"] == figures["accuracy"]


def test_the_status_counts_only_records_under_their_current_key(tmp_path: Path) -> None:
    data = prepare_data(tmp_path / "data", validation_samples=300, test_samples=100)
    plan = Plan(
        out=tmp_path,
        data=data,
        grid=QUICK_GRID,
        tune_budget=Budget(2, 1),
        final_budget=Budget(2, 1),
        seeds=(0, 1),
        reuse=True,
        base={"batch_size": 16},
        ledger=tmp_path / "ledger",
        split=SPLIT,
        teachers=PROTOCOL_TEACHERS,
    )
    only = {"kd_real/mfs"}
    (row,) = ledger_status(plan, "homogeneous", 6, only)
    assert (row["tune_done"], row["tune_total"], row["final_done"]) == (0, 1, None)
    cell = Cell(Method.KD_REAL, StudentKind.MFS)
    packages = protocol_teacher_directories(PROTOCOL_TEACHERS, federation_jobs(
        "homogeneous", 6, data.owners), SPLIT)  # fmt: skip
    (setting,) = settings_for(cell.objective, QUICK_GRID)
    tune = _spec(plan, "homogeneous", "tune", cell, setting, 0, packages)
    write_record(Path(tune["record"]), "a stale key", {**FIGURES, "train_seconds": 1.0}, 1)
    assert ledger_status(plan, "homogeneous", 6, only)[0]["tune_done"] == 0
    write_record(Path(tune["record"]), tune["key"], {**FIGURES, "train_seconds": 1.0}, 1)
    final = _spec(plan, "homogeneous", "final", cell, setting, 1, packages)
    write_record(Path(final["record"]), final["key"], {**FIGURES, "train_seconds": 1.0}, 1)
    (row,) = ledger_status(plan, "homogeneous", 6, only)
    assert (row["tune_done"], row["final_done"], row["final_total"]) == (1, 1, 2)
