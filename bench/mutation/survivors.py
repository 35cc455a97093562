"""The surviving mutants of a cosmic-ray session: job id, operator, occurrence, line and the diff."""
import json
import subprocess
import sys

lines = subprocess.run(["cosmic-ray", "dump", sys.argv[1]], capture_output=True, text=True, check=True).stdout
for line in lines.splitlines():
    item, result = json.loads(line)
    if result and result.get("test_outcome") == "survived":
        for spec in item["mutations"]:
            diff = "\n".join(l for l in (result.get("diff") or "").splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---"))
            print(f"{item['job_id'][:8]} {spec['operator_name'].replace('core/', '')} #{spec['occurrence']} "
                  f"line {spec['start_pos'][0]}\n{diff}")
