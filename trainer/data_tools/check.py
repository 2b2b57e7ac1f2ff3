"""`chatfabric data check FILE...`: every format and role-order error, each with its line and
record id; exit status 1 when there is any."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .records import scan


def check(paths: Sequence[str | Path], out=None) -> int:
    """Print every error as `FILE:LINE (record ID): reason`; the number of errors."""
    out = out or sys.stdout
    errors = total = 0
    for path in paths:
        records = scan(path)
        for record in records:
            if record.error is not None:
                errors += 1
                print(str(record.error), file=out)
        total += sum(not r.whole_file for r in records)
    print(f"{total} records, {errors} with errors" if errors else f"{total} records, no errors", file=out)
    return errors
