"""The parts build, add and merge share: one options type per job with each default defined once
(build_index/options.py), one job context whose steps are all named (build_index/job.py, runner.BuildJob),
and the Ray scheduler's pure parts (build_index/engine_ray.py)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from types import SimpleNamespace

import pytest

from img2prompt.build_index.add import AddJob, AddOptions
from img2prompt.build_index.job import JobContext
from img2prompt.build_index.merge import KeyPlan, MergeJob, MergeOptions
from img2prompt.build_index.options import BuildOptions, as_build, index_settings
from img2prompt.build_index.runner import BuildJob
from img2prompt.errors import UserError

JOBS = (BuildOptions, AddOptions, MergeOptions)
# the same name, another meaning: AddOptions.index is the folder grown, BuildOptions.index the search kind;
# clip_model is required by a build, None (as the manifest names it) for an add or a merge
DIFFERENT_MEANING = {"index", "clip_model"}


def defaults(options_type: type) -> dict:
    """Each field's default (its factory for a mutable one; MISSING for a required field)."""
    return {item.name: item.default if item.default is not dataclasses.MISSING else item.default_factory
            for item in dataclasses.fields(options_type)}


def with_default(options_type: type) -> set[str]:
    return {name for name, default in defaults(options_type).items() if default is not dataclasses.MISSING}


def test_a_setting_two_jobs_share_has_one_default_defined_once():
    names = [with_default(job) for job in JOBS]
    shared = {name for i, a in enumerate(names) for b in names[i + 1:] for name in a & b} - DIFFERENT_MEANING
    assert {"device", "shard_size", "batch_size", "column", "max_chars", "near_dup", "key_dims", "overwrite",
            "resume", "progress", "clip_pretrained", "text_model", "pairs"} <= shared
    for name in shared:
        having = [job for job in JOBS if name in with_default(job)]
        assert len({repr(defaults(job)[name]) for job in having}) == 1, name
        # defined in one group, which every job having the setting inherits; no job class writes it again
        owners = {klass for job in having for klass in job.__mro__ if name in vars(klass).get("__annotations__", {})}
        assert len(owners) == 1 and not owners & set(JOBS), (name, owners)


def test_the_public_fields_are_those_the_front_ends_read():
    assert set(defaults(AddOptions)) == {"index", "corpus", "clip_model", "clip_pretrained", "text_model", "column",
                                         "batch_size", "device", "shard_size", "max_chars", "resume", "progress",
                                         "retrain", "pairs", "near_dup"}
    assert set(defaults(MergeOptions)) == {"indexes", "out", "clip_model", "clip_pretrained", "text_model", "device",
                                           "shard_size", "overwrite", "resume", "progress", "key_dims"}
    assert defaults(AddOptions)["clip_model"] is None and defaults(BuildOptions)["shard_size"] == 100_000
    # the required fields stay positional, in their old order
    assert AddOptions("idx", ["a.txt"]).index == "idx"
    assert MergeOptions(["a", "b"], "out").out == "out"
    assert BuildOptions(["a.txt"], "out", "ViT-B-32").clip_model == "ViT-B-32"


def test_an_add_runs_builds_steps_with_its_own_settings_and_the_index_s():
    add = AddOptions(index="/data/idx", corpus=["new.txt"], batch_size=32, shard_size=64, near_dup=0.9,
                     column="text", device="cpu", progress=False, resume=True, clip_model="clip")
    manifest = {"search": {"kind": "hnsw"}, "build_options": {"max_memory": 123, "seed": 7}}
    build = as_build(add, corpus=["new.txt"], out="/data/idx", clip_model="clip", **index_settings(manifest))
    assert (build.batch_size, build.shard_size, build.near_dup, build.column, build.device, build.progress,
            build.resume) == (32, 64, 0.9, "text", "cpu", False, True)
    assert (build.index, build.max_memory, build.seed, build.regression) == ("hnsw", 123, 7, False)
    assert build.key_dims is None and build.overwrite is False  # not an add's settings: build's defaults
    merged = as_build(MergeOptions(indexes=["a", "b"], out="c", key_dims=8, overwrite=True), corpus=[], out="c",
                      clip_model="clip", **index_settings({"regression": {}}))
    assert (merged.key_dims, merged.overwrite, merged.index, merged.seed, merged.regression) == \
        (8, True, "auto", 0, True)
    assert merged.batch_size == BuildOptions.batch_size and merged.near_dup is None


def context(**options) -> JobContext:
    build = BuildOptions(corpus=[], out="out", clip_model="clip", **options)
    return JobContext(build, *(None,) * 4, models={}, device="cpu", timer=None)


def step_names(job) -> list[str]:
    return [name for name, _ in job.steps()]


def test_every_phase_of_every_job_is_a_named_step():
    assert step_names(BuildJob(context())) == ["encode", "consolidate", "search", "calibration", "regression",
                                               "phrases"]
    assert step_names(BuildJob(context(near_dup=0.9, key_dims=8, minilm_dtype="int8"))) == [
        "encode", "near_dup", "consolidate", "key_pca", "search", "calibration", "phrases", "compact"]
    old = SimpleNamespace(manifest={"files": {"regression.npz": {}, "phrases.parquet": {}}, "key_pca": {}})
    assert step_names(AddJob(context(near_dup=0.9), old=old)) == [
        "encode", "near_dup", "nothing_new", "append", "key_pca", "search", "calibration", "regression", "phrases"]
    assert step_names(AddJob(context(), old=SimpleNamespace(manifest={"files": {}}))) == [
        "encode", "nothing_new", "append", "search", "calibration"]
    inputs = [SimpleNamespace(manifest={"regression": {}}, text_dim=4)]
    assert step_names(MergeJob(context(), inputs=inputs, plan=KeyPlan(None, [False]))) == [
        "encode", "consolidate", "search", "calibration", "regression", "phrases"]


def test_a_step_that_sets_the_outcome_ends_the_job_without_a_commit():
    class Job(BuildJob):
        ran: list = []

        def steps(self):
            return [("first", lambda: self.ran.append("first")), ("stop", self.stop),
                    ("never", lambda: self.ran.append("never"))]

        def stop(self):
            self.outcome = "unchanged"

        def commit(self):
            raise AssertionError("committed")

    assert Job(context()).run() == "unchanged" and Job.ran == ["first"]


# -- the Ray scheduler's parts (no cluster: fake actors) --------------------------------------------------


CALLS = itertools.count()


class FakeMethod:
    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def remote(self, *args):
        self.calls.append((self.name, args))
        return f"{self.name}-{next(CALLS)}"  # an ObjectRef stand-in: unique per call


class FakeActor:
    def __init__(self) -> None:
        self.calls: list = []
        self.encode, self.ready = FakeMethod(self.calls, "encode"), FakeMethod(self.calls, "ready")


@pytest.fixture
def engine_ray():
    pytest.importorskip("ray", reason="the optional `ray` extra is not installed")
    from img2prompt.build_index import engine_ray

    return engine_ray


def scheduler(engine_ray, workers: int = 2, max_tries: int = 3):
    return engine_ray._Scheduler(iter(()), workers, FakeActor, sink=None, root=None, fetching=None,
                                 max_tries=max_tries)


def test_tasks_go_to_ready_actors_least_busy_first_at_most_two_each(engine_ray):
    sched = scheduler(engine_ray, workers=3)
    sched.start_all()
    assert [kind for kind, *_ in sched.pending.values()] == ["ready"] * 3
    sched.slots[0].ready = sched.slots[2].ready = True  # worker 1 is still loading its models
    sched.retry.extend(engine_ray._Attempt(SimpleNamespace(number=n), f"task-{n}") for n in range(5))
    sched.fill()
    assert [[attempt.task.number for _, attempt in slot.running] for slot in sched.slots] == [[0, 2], [], [1, 3]]
    assert [slot.calls for slot in sched.slots] == [2, 0, 2]  # each actor's calls numbered in order (seq)
    assert [attempt.task.number for attempt in sched.retry] == [4]  # no room left: it waits
    assert sched.running_calls() == 4 and not sched.all_done()


def test_a_failed_try_counts_against_the_shard_and_the_third_stops_the_build(engine_ray, caplog):
    sched = scheduler(engine_ray, max_tries=3)
    slot, attempt = sched.slots[1], engine_ray._Attempt(SimpleNamespace(number=7), "ref")
    sched.failed(attempt, slot, "behind a dead worker's call", counts=False)
    assert (attempt.tries, slot.failures, len(sched.retry)) == (0, 0, 1)  # free: not this shard's fault
    with caplog.at_level(logging.WARNING, logger="img2prompt.build_index.engine_ray"):
        sched.failed(attempt, slot, "boom", counts=True)
        sched.failed(attempt, slot, "boom", counts=True)
        with pytest.raises(UserError, match=r"^shard 7 failed after 3 tries: boom$"):
            sched.failed(attempt, slot, "boom", counts=True)
    assert "shard 7 failed on worker 1 (starting; 2 failures on it) — try 2 of 3: boom" in caplog.text


def test_the_progress_lines_count_shards_rows_and_failures(engine_ray):
    slots = [engine_ray._Slot(0), engine_ray._Slot(1, failures=2)]
    tally = engine_ray._Tally(began=100.0, submitted=4, done=3, rows=300)
    assert tally.progress_line(110.0, exhausted=False, slots=slots) == \
        "ray: 3/4+ shards, 300 prompts, 30 prompts/s over 2 workers; failures per worker: {1: 2}"
    assert tally.progress_line(110.0, exhausted=True, slots=slots[:1]).startswith("ray: 3/4 shards")
    assert tally.progress_line(110.0, exhausted=True, slots=slots[:1]).endswith("failures per worker: none")
    assert tally.end_line(150.0, slots) == "ray: encoded 3 shards, 300 prompts in 50.0 s (6 prompts/s over 2 workers)"
    tally.last_warning = 130.0
    assert tally.quiet_for(140.0) == 10.0


def test_no_function_in_build_index_is_a_monolith():
    """The package's rule: no function over 80 lines or 20 branches (build_index/ here)."""
    import ast
    from pathlib import Path

    import img2prompt.build_index as package

    branches = (ast.If, ast.For, ast.While, ast.Try, ast.With, ast.IfExp, ast.BoolOp, ast.ExceptHandler,
                ast.comprehension, ast.Match, ast.AsyncFor, ast.AsyncWith)
    found = []
    for path in sorted(Path(package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                count = sum(isinstance(inner, branches) for inner in ast.walk(node))
                if lines > 80 or count > 20:
                    found.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines, {count} branches)")
    assert not found
