"""Re-run a session's surviving mutants against a test command (the "after" score: adding tests can only
turn survivors into kills, so the killed ones need no rerun). Restores the module from a copy after each.

    python bench/mutation/rerun_survivors.py bench/mutation/out/NAME.sqlite "TEST COMMAND" [PREVIOUS_AFTER.txt]
Prints one line per survivor (killed / survived) and the counts; exit 0. With a previous rerun's output, only
the survivors it left are run again (after more tests were added).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

db, command = sys.argv[1], sys.argv[2]
only = None
if len(sys.argv) > 3:
    only = {line.split()[0] for line in open(sys.argv[3]) if line.split()[-2:-1] == ["survived"] or
            " survived " in line}
dump = subprocess.run(["cosmic-ray", "dump", db], capture_output=True, text=True, check=True).stdout
env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
killed = survived = 0
for line in dump.splitlines():
    item, result = json.loads(line)
    if not result or result.get("test_outcome") != "survived":
        continue
    if only is not None and item["job_id"][:8] not in only:
        continue
    spec = item["mutations"][0]
    module = spec["module_path"]
    backup = tempfile.mktemp()
    shutil.copy2(module, backup)
    try:
        subprocess.run(["cosmic-ray", "apply", module, spec["operator_name"], str(spec["occurrence"])], check=True)
        proc = subprocess.run(shlex.split(command), capture_output=True, text=True, env=env, timeout=600)
    finally:
        shutil.copy2(backup, module)
        os.unlink(backup)
    outcome = "killed" if proc.returncode else "survived"
    killed += proc.returncode != 0
    survived += proc.returncode == 0
    failed = [l for l in proc.stdout.splitlines() if l.startswith("FAILED")]
    print(f"{item['job_id'][:8]} {spec['operator_name'].replace('core/', '')} #{spec['occurrence']} "
          f"line {spec['start_pos'][0]}: {outcome} {failed[:1]}", flush=True)
print(f"survivors rerun: {killed} killed, {survived} still survive")
