"""Counts of a cosmic-ray session: total, skipped by the filters, pending, killed, survived, incompetent."""
import sqlite3
import sys

con = sqlite3.connect(sys.argv[1])
total = con.execute("select count(*) from mutation_specs").fetchone()[0]
rows = dict(con.execute("select coalesce(test_outcome, worker_outcome), count(*) from work_results group by 1"))
done = sum(rows.values())
print(f"specs {total}, results {done} {rows}, pending {total - done}")
