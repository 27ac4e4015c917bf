"""The epsilon table over distillation seeds: mean and spread of tables run once per seed.

    python bench/epsilon_seeds.py --out DIR TABLE.json [TABLE.json ...]

Each TABLE.json is an ``epsilon_table.json`` of ``bench/privacy.py --epsilon-table``, one per
``--distill-seed``, all with the same settings otherwise (recipes, delta, teacher epochs,
distillation iterations). For every epsilon: the seeds that have its row, the teachers' and
the ensemble's accuracy (the same teachers under every seed: they are cached by job), the
student's mean of headers as mean and sample standard deviation over seeds, and the gap to the
non-private student paired by seed (each seed's row against the same seed's ``inf`` row).
Writes DIR/epsilon_seeds.json and appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.privacy import SHARED_SETTINGS, read_table  # noqa: E402
from bench.results import append_section  # noqa: E402


def spread(values: list[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (None for one value) of ``values``."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def aggregate(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread per epsilon of ``tables`` (one per distillation seed, settings equal)."""
    if not tables:
        raise ValueError("no tables")
    for table in tables:
        if not table.get("complete", False):
            raise ValueError(f"the table of seed {table['distill_seed']} is not complete")
    settings = [k for k in SHARED_SETTINGS if k != "distill_seed"]
    first = tables[0]
    for table in tables[1:]:
        differ = [k for k in settings if table.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"tables with other settings ({', '.join(differ)})")
    seeds = [table["distill_seed"] for table in tables]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a distillation seed twice: {seeds}")
    by_seed = {
        table["distill_seed"]: {row["epsilon"]: row for row in table["rows"]} for table in tables
    }
    epsilons = sorted(
        {eps for rows in by_seed.values() for eps in rows},
        key=lambda e: math.inf if e is None else e,
    )
    rows = []
    for epsilon in epsilons:
        present = {seed: rows_[epsilon] for seed, rows_ in by_seed.items() if epsilon in rows_}
        paired = [
            row["student_mean"] - by_seed[seed][None]["student_mean"]
            for seed, row in present.items()
            if epsilon is not None and None in by_seed[seed]
        ]
        teachers = {tuple(row["teachers"]) for row in present.values()}
        if len(teachers) != 1:
            raise ValueError(f"epsilon {epsilon}: other teachers under other seeds")
        any_row = next(iter(present.values()))
        rows.append(
            {
                "epsilon": epsilon,
                "seeds": sorted(present),
                "teachers": any_row["teachers"],
                "teacher_ensemble": any_row["teacher_ensemble"],
                "student_mean": spread([row["student_mean"] for row in present.values()]),
                "student_by_seed": {
                    str(seed): row["student_mean"] for seed, row in sorted(present.items())
                },
                "gap_to_non_private": spread(paired) if paired else None,
            }
        )
    return {
        "settings": {k: first.get(k) for k in settings},
        "seeds": sorted(seeds),
        "rows": rows,
    }


def markdown(report: dict[str, Any], paths: list[str]) -> str:
    """The RESULTS.md table of ``report``."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    s = report["settings"]

    def points(stats: dict | None) -> str:
        if stats is None:
            return "-"
        std = "" if stats["std"] is None else f" ± {100 * stats['std']:.2f}"
        return f"{100 * stats['mean']:+.2f}{std} (n={stats['n']})"

    lines = [
        f"\n### Utility against epsilon over distillation seeds, {stamp}\n",
        f"Command: `python bench/epsilon_seeds.py {' '.join(sys.argv[1:])}`; tables: "
        + ", ".join(f"`{p}`" for p in paths)
        + f". Settings as the tables': DP recipe {s['dp_architecture']}, {s['dp_epochs']} "
        f"epochs at expected batch {s['dp_batch_size']}, Adam {s['dp_learning_rate']:g}, clip "
        f"{s['dp_max_grad_norm']:g}, delta {s['delta']:g}; non-private teachers "
        f"{s['teacher_epochs_non_private']} epochs; {s['distill_iterations']} distillation "
        "iterations. The teachers are the same under every seed (cached by job); the seeds "
        "vary the distillation. Student: mean ± sample standard deviation over seeds; the gap "
        "is paired by seed.\n",
        "| epsilon | seeds | teachers % | ensemble % | student, mean of headers % | "
        "student by seed % | vs. non-private student, points |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        student = row["student_mean"]
        std = "" if student["std"] is None else f" ± {100 * student['std']:.2f}"
        gap = row["gap_to_non_private"]
        lines.append(
            f"| {'inf (no DP)' if row['epsilon'] is None else format(row['epsilon'], 'g')} | "
            f"{', '.join(map(str, row['seeds']))} | "
            f"{' / '.join(f'{100 * t:.2f}' for t in row['teachers'])} | "
            f"{100 * row['teacher_ensemble']:.2f} | {100 * student['mean']:.2f}{std} | "
            + ", ".join(f"{100 * v:.2f}" for v in row["student_by_seed"].values())
            + f" | {points(gap)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("tables", type=Path, nargs="+", metavar="TABLE.json")
    args = parser.parse_args()
    try:
        report = aggregate([read_table(path) for path in args.tables])
    except (ValueError, OSError, KeyError) as exc:
        raise SystemExit(f"epsilon_seeds: {exc}") from exc
    report["tables"] = [str(p) for p in args.tables]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "epsilon_seeds.json").write_text(json.dumps(report, indent=2) + "\n")
    append_section(markdown(report, report["tables"]))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
