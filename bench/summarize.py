"""Summarize `run.sh` result lines as a markdown table: fulmen beside the reference server.

usage: python bench/summarize.py [--ref uvicorn] round-1.txt [round-2.txt ...]

Each file holds the raw lines of one round, in the format of `../shared/bench/run.sh`:

    NAME SCENARIO req_per_s p50_ms p99_ms errors [key=value ...] [server_died]
    NAME SCENARIO fail - - - reason...
    NAME SCENARIO unsupported

Lines starting with `#` are ignored. The value of a scenario is its req/s, except `idle5k`, where
it is `kib_per_conn=` (KiB of server memory per idle connection: lower is better). With several
rounds, the table shows the median value per server and the median of the per-round ratios
(server / reference), so that a ratio only compares measurements taken side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field

ORDER = ("hello", "hello-c1000", "close", "echo4k", "stream1m", "h2", "idle5k", "ws")
MEMORY_SCENARIOS = frozenset({"idle5k"})
# run.sh's CPU accounting extras, left out of a failure's reason
_ACCOUNTING = ("srv_cpu=", "srv_sys=", "cli_cpu=", "oth_cpu=", "cpus=", "tries=", "waited=")


@dataclass
class Result:
    """One server's outcome for one scenario in one round."""

    value: float | None = None  # req/s, or KiB per connection for idle5k
    errors: float = 0.0
    problem: str = ""  # "fail: ...", "unsupported", "server died"
    extras: dict[str, str] = field(default_factory=dict)


def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("%"))
    except ValueError:
        return None


def parse_line(line: str) -> tuple[str, str, Result] | None:
    """(name, scenario, result) for one run.sh line, or None for blank and comment lines."""
    parts = line.split()
    if len(parts) < 3 or parts[0].startswith("#"):
        return None
    name, scenario, first = parts[0], parts[1], parts[2]
    if first == "unsupported":
        return name, scenario, Result(problem="unsupported")
    if first == "fail":
        reason = " ".join(p for p in parts[3:] if p != "-" and not p.startswith(_ACCOUNTING))
        return name, scenario, Result(problem=f"fail: {reason}".rstrip(": "))
    result = Result()
    for item in parts[6:]:
        key, sep, value = item.partition("=")
        if sep:
            result.extras[key] = value
        elif item == "server_died":
            result.problem = "server died"
    if scenario in MEMORY_SCENARIOS:
        result.value = _number(result.extras.get("kib_per_conn", "-"))
    else:
        result.value = _number(first)
    if len(parts) > 5:
        result.errors = _number(parts[5]) or 0.0
    if result.value is None and not result.problem:
        result.problem = "no value"
    return name, scenario, result


def read_round(path: str) -> dict[tuple[str, str], Result]:
    """The results of one round file; a repeated (name, scenario) keeps its last line."""
    results: dict[tuple[str, str], Result] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            parsed = parse_line(line)
            if parsed is not None:
                name, scenario, result = parsed
                results[name, scenario] = result
    return results


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _format(value: float | None, scenario: str) -> str:
    if value is None:
        return "-"
    if scenario in MEMORY_SCENARIOS:
        return f"{value:.1f} KiB"
    return f"{value:,.0f}"


def summarize(rounds: list[dict[tuple[str, str], Result]], ref: str) -> str:
    """The markdown table for these rounds, one row per scenario."""
    names: list[str] = []
    scenarios: list[str] = []
    for results in rounds:
        for name, scenario in results:
            if name not in names:
                names.append(name)
            if scenario not in scenarios:
                scenarios.append(scenario)
    scenarios.sort(key=lambda s: ORDER.index(s) if s in ORDER else len(ORDER))
    others = [name for name in names if name != ref]
    servers = [*others, ref] if ref in names else others

    header = ["scenario", *servers, *(f"{name}/{ref}" for name in others), "notes"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scenario in scenarios:
        cells = [scenario]
        notes: list[str] = []
        for name in servers:
            present = [r[name, scenario] for r in rounds if (name, scenario) in r]
            values = [res.value for res in present if res.value is not None and not res.problem]
            problems = sorted({res.problem for res in present if res.problem})
            errors = sum(res.errors for res in present)
            cell = _format(_median(values), scenario)
            if not values and problems:
                cell = problems[0].split(":")[0]
            cells.append(cell)
            notes += [f"{name}: {problem}" for problem in problems]
            if errors and scenario not in MEMORY_SCENARIOS:
                notes.append(f"{name}: {errors:.0f} errors")
        for name in others:
            ratios = []
            for results in rounds:
                mine, theirs = results.get((name, scenario)), results.get((ref, scenario))
                if mine is None or theirs is None or mine.problem or theirs.problem:
                    continue
                if mine.value and theirs.value:
                    ratios.append(mine.value / theirs.value)
            ratio = _median(ratios)
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        cells.append("; ".join(notes))
        rows.append("| " + " | ".join(cells) + " |")

    lower = " (idle5k: KiB per idle connection, lower is better)" if "idle5k" in scenarios else ""
    intro = (
        f"Rounds: {len(rounds)}. req/s, median over rounds{lower}; "
        f"ratio = median of the per-round ratios to {ref}."
    )
    return "\n".join([intro, "", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="uvicorn", help="reference server name (default: uvicorn)")
    parser.add_argument("files", nargs="+", help="round files with run.sh lines")
    args = parser.parse_args(argv)
    rounds = [read_round(path) for path in args.files]
    print(summarize(rounds, args.ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
