"""``python -m gradwatch.zoo [NAME ...]``: run the zoo (or the cases whose name contains one of
the words) and print its table."""

import logging
import sys
import time

from gradwatch.zoo.cases import CASES
from gradwatch.zoo.run import run_case, table


def main(argv: list[str]) -> int:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cases = [c for c in CASES if not argv or any(w in c.name for w in argv)]
    start = time.perf_counter()
    results = []
    for case in cases:
        results.append(run_case(case))
        r = results[-1]
        print(f"{case.name}: {r.said} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
    print(table(results))
    print(f"\nthe zoo took {time.perf_counter() - start:.0f} s")
    return 0 if all(r.right for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
