"""Mutation score of one module: before (the module's existing tests, the cosmic-ray session) and after (its
survivors re-run with the new tests, bench/mutation/out/NAME.after.txt from rerun_survivors.py), leaving out
the equivalent mutants listed with their reasons in bench/mutation/equivalent/NAME.txt
("OPERATOR #OCCURRENCE line N: reason", matched on operator and occurrence).

    python bench/mutation/score.py NAME
Counts only mutants inside the config's line-filter ranges (when it has one).
"""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

name = sys.argv[1]
here = Path(__file__).parent
config = tomllib.loads((here / f"{name}.toml").read_text())["cosmic-ray"]
ranges = []
for specs in config.get("filters", {}).get("line-filter", {}).get("lines", {}).values():
    for spec in specs:
        low, _, high = spec.partition("-")
        ranges.append((int(low), int(high or low)))
dump = subprocess.run(["cosmic-ray", "dump", str(here / "out" / f"{name}.sqlite")], capture_output=True, text=True,
                      check=True).stdout
key = lambda operator, occurrence: f"{operator.replace('core/', '')} #{occurrence}"
outcome = {}
for line in dump.splitlines():
    item, result = json.loads(line)
    spec = item["mutations"][0]
    if not result or result.get("worker_outcome") == "skipped":
        continue
    if ranges and not any(low <= spec["start_pos"][0] <= high for low, high in ranges):
        continue
    outcome[key(spec["operator_name"], spec["occurrence"])] = (result.get("test_outcome") or "incompetent")
after = {}
after_file = here / "out" / f"{name}.after.txt"
if after_file.exists():
    for line in after_file.read_text().splitlines():
        found = re.match(r"^[0-9a-f]{8} (\S+ #\d+) line \d+: (killed|survived)", line)
        if found:
            after[found[1]] = found[2]
equivalent = set()
equivalent_file = here / "equivalent" / f"{name}.txt"
if equivalent_file.exists():
    for line in equivalent_file.read_text().splitlines():
        found = re.match(r"^(\S+ #\d+) line \d+:", line)
        if found:
            equivalent.add(found[1])
total = len(outcome)
killed = sum(value == "killed" for value in outcome.values())
survivors = [k for k, v in outcome.items() if v == "survived"]
incompetent = sum(value not in ("killed", "survived") for value in outcome.values())
equiv = [k for k in survivors if k in equivalent]
new_kills = [k for k in survivors if after.get(k) == "killed" and k not in equivalent]
left = [k for k in survivors if k not in equivalent and after.get(k) != "killed"]
unclassified_after = [k for k in equiv if after.get(k) == "killed"]
real = total - len(equiv)
print(json.dumps({"module": config["module-path"], "mutants": total, "killed_before": killed,
                  "incompetent": incompetent, "survived_before": len(survivors),
                  "killed_by_new_tests": len(new_kills), "equivalent": len(equiv), "still_surviving": len(left),
                  "score_before_pct": round(100 * killed / real, 1) if real else None,
                  "score_after_pct": round(100 * (killed + len(new_kills)) / real, 1) if real else None,
                  "left": left, "equivalent_but_killed": unclassified_after}, indent=1))
