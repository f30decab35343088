"""Summarize Autobahn|Testsuite fuzzingclient reports: usage autobahn_report.py OUTDIR ...

Each OUTDIR holds the index.json written by `wstest -m fuzzingclient`; the line printed for it
is labelled with the directory's name (the engine). A case counts as its `behavior` (OK,
NON-STRICT, INFORMATIONAL, UNIMPLEMENTED), except that it is FAILED when its `behavior` or
its `behaviorClose` is FAILED, WRONG CODE or UNCLEAN. Exit status 1 if any case failed.
"""

import json
import sys
from collections import Counter
from pathlib import Path

PASSING = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED")
COLUMNS = (*PASSING, "FAILED")


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def summarize(outdir: Path) -> bool:
    """Print the counts for one report directory; return whether every case passed."""
    index = json.loads((outdir / "index.json").read_text())
    cases = {case_id: result for agent in index.values() for case_id, result in agent.items()}
    verdicts: Counter[str] = Counter()
    closes: Counter[str] = Counter()
    failed = []
    for case_id in sorted(cases, key=case_key):
        behavior = cases[case_id]["behavior"]
        close = cases[case_id]["behaviorClose"]
        closes[close] += 1
        if behavior in PASSING and close in PASSING:
            verdicts[behavior] += 1
        else:
            verdicts["FAILED"] += 1
            failed.append(f"{case_id} ({behavior}/{close})")
    counts = "  ".join(f"{name} {verdicts[name]}" for name in COLUMNS)
    print(f"{outdir.name:<18} {len(cases):>4} cases  {counts}")
    print(f"{'':<18} behaviorClose: " + "  ".join(f"{k} {v}" for k, v in sorted(closes.items())))
    if failed:
        print(f"{'':<18} failed: " + " ".join(failed))
    return not failed and bool(cases)


def main() -> int:
    results = [summarize(Path(arg)) for arg in sys.argv[1:]]
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
