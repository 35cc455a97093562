"""A fresh clone has no ../shared (real corpora, the Kaggle sample): every test that needs it is skipped, and
its reason names the missing folder (README, Tests, says which tests those are)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # collects the whole suite in a subprocess
def test_without_shared_every_such_test_skips_naming_what_is_missing(tmp_path):
    env = {**os.environ, "IMG2PROMPT_TEST_SHARED": str(tmp_path / "absent")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "shared", "-rs", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert "passed" not in summary and "failed" not in summary and "error" not in summary, summary
    assert skipped >= 16, summary
    reasons = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all(re.search(r"\.\./shared/[\w./-]+ is absent", line) for line in reasons), reasons
    counted = sum(int(re.match(r"SKIPPED \[(\d+)\]", line).group(1)) for line in reasons)
    assert counted == skipped
