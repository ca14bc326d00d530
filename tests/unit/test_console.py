"""The console: which lines a person sees, which go to the stage's log file, and a failure told
in one paragraph with the path of a log file that holds its traceback."""

import os
import sys

import pytest

from tailorlm import console as C
from tailorlm import console_files
from tailorlm import console_text as T


def test_stage_tags_are_shown_and_everything_else_is_not():
    assert T.is_stage_message("[train] step 10/60 eval_loss 3.1 ppl 22.0")
    assert T.is_stage_message("\x1b[36m[tune] resuming the interrupted sweep\x1b[0m")
    for line in (
        "[2026-12-03 12:26:15,112] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU",
        "[dataset]: A new progress UI is available",
        "Loading weights: 100%|##########| 20/20",
        "INFO 12-03 vLLM engine started [train] not at the start",
        "[trainer] not a stage",
    ):
        assert not T.is_stage_message(line), line


def test_worker_batch_lines_keep_rays_prefix_in_the_file_and_only_tagged_ones_are_shown():
    batch = {
        "pid": 123,
        "actor_name": "RayTrainWorker",
        "ip": "10.0.0.2",
        "localhost": "10.0.0.1",
        "lines": [
            "[train] step 10/60 eval_loss 3.1000 ppl 22.20",
            "DeepSpeed shm_comm_op built successfully",
            '{"__ray_tqdm_magic_token__": true, "x": 1}',
        ],
    }
    out = list(T.worker_lines(batch))
    assert out == [
        (
            "(RayTrainWorker pid=123, ip=10.0.0.2) [train] step 10/60 eval_loss 3.1000 ppl 22.20",
            "[train] step 10/60 eval_loss 3.1000 ppl 22.20",
        ),
        ("(RayTrainWorker pid=123, ip=10.0.0.2) DeepSpeed shm_comm_op built successfully", ""),
    ]  # the progress-bar update is dropped
    local = list(T.worker_lines({"pid": 7, "ip": "h", "localhost": "h", "lines": ["x"]}))
    assert local == [("(pid=7) x", "")]


def test_caller_decides_whether_a_print_in_this_process_is_shown():
    seen = {}
    code = "import sys\nseen['frame'] = sys._getframe()"
    exec(code, {"__name__": "tailorlm.data.stage", "seen": seen})
    assert T.from_tailorlm(seen["frame"])
    exec(code, {"__name__": "ray.tune.progress_reporter", "seen": seen})
    assert not T.from_tailorlm(seen["frame"])
    assert not T.from_tailorlm(sys._getframe())  # a test module is a library here


def test_one_paragraph_takes_what_a_worker_raised_out_of_rays_wrapping():
    wrapped = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "/x/loop.py", line 330, in train_loop\n    eval_and_checkpoint()\n    ^^^\n'
        "UnboundLocalError: cannot access local variable 'ray'\n"
    )
    text = T.one_paragraph(wrapped)
    assert text == (
        "RuntimeError: Training failed due to worker errors: UnboundLocalError: cannot access local variable 'ray'"
    )

    class TaskError(Exception):
        def __init__(self, cause):
            super().__init__("task failed\n" + "  File ...\n" * 200)
            self.cause = cause

    text = T.one_paragraph(TaskError(ValueError("bad\nrow 7")))
    assert text == "TaskError <- ValueError: bad row 7"
    assert len(T.one_paragraph(ValueError("x" * 5000))) == 700


def test_remote_run_storage_logs_locally_then_uploads(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setattr(console_files.tempfile, "gettempdir", lambda: str(tmp_path))
    logs = console_files.LogFiles("memory://bucket/runs/r1", "r1")
    assert logs.dir.startswith(str(tmp_path)) and logs.remote == "memory://bucket/runs/r1/logs"
    con = C.Console(logs, open(os.devnull, "w"))
    with con.stage("data"):
        con.file("hello from data\n")
    assert "hello from data" in fsspec.open("memory://bucket/runs/r1/logs/data.log", "r").open().read()
    local = console_files.LogFiles(str(tmp_path / "runs" / "r2"))
    assert local.remote is None and local.dir == str(tmp_path / "runs" / "r2" / "logs")


def test_session_shows_stage_lines_and_files_library_output(tmp_path, capfd):
    logs = console_files.LogFiles(str(tmp_path / "run"))
    with C.session(logs) as con:
        exec("print('[data] kept 10 rows')", {"__name__": "tailorlm.data.stage"})
        print("a library's chatter")  # called from this test module: not tailorlm's
        print("to stderr", file=sys.stderr)
        os.write(2, b"from C code\n")  # fd level, as Ray's core worker writes
        con.worker_batch({"pid": 9, "lines": ["[train] step 1/2", "worker noise"]})
        with C.stage_log("train"):
            exec("print('[train] step 2/2')", {"__name__": "tailorlm.train.stage"})
    out = capfd.readouterr()
    assert out.out.splitlines() == ["[data] kept 10 rows", "[train] step 1/2", "[train] step 2/2"]
    assert out.err == ""
    driver = (tmp_path / "run" / "logs" / "driver.log").read_text()
    for text in ("[data] kept 10 rows", "a library's chatter", "to stderr", "(pid=9) worker noise"):
        assert text in driver
    # fd output is read by a thread: it lands in the file current when it is read (ms later)
    assert "from C code" in driver + (tmp_path / "run" / "logs" / "train.log").read_text()
    assert "[train] step 2/2" in (tmp_path / "run" / "logs" / "train.log").read_text()
    assert sys.stdout is not None and C.active() is None


def test_a_failing_stage_names_its_log_file_which_holds_the_traceback(tmp_path, capfd):
    """The CLI on a data source that does not exist: the stage, the error, and the log's path."""
    from tailorlm.cli import main

    rc = main(
        [
            "data",
            "jobs/configs/tiny_cpu.yaml",
            f"run.storage={tmp_path}",
            "run.name=fails",
            f"data.sources=[{{path: '{tmp_path}/missing.jsonl'}}]",
        ]
    )
    out = capfd.readouterr()
    assert rc == 1
    log = tmp_path / "fails" / "logs" / "data.log"
    assert "[data] failed:" in out.err and "missing.jsonl' does not exist" in out.err
    assert str(log) in out.err and "Traceback" not in out.out + out.err
    assert log.exists() and "Traceback (most recent call last)" in log.read_text()
    assert "SourceError" in log.read_text()
    # the rerun (as a user does after reading the message) keeps the failed run's log beside its own
    first = log.read_text()
    assert main(["data", "jobs/configs/tiny_cpu.yaml", f"run.storage={tmp_path}", "run.name=fails"]) == 0
    assert (tmp_path / "fails" / "logs" / "data.prev.log").read_text() == first
    assert "SourceError" not in log.read_text()


@pytest.mark.parametrize("verbose", [False, True])
def test_unexpected_errors_keep_their_type_and_expected_ones_read_as_before(tmp_path, capfd, verbose):
    logs = console_files.LogFiles(str(tmp_path / "run"))
    with C.session(logs, verbose=verbose) as con:
        con.report_failure(ValueError("--output d: name a new or empty folder"), expected=True)
        try:
            with con.stage("export"):
                raise KeyError("variant")
        except KeyError as exc:
            con.report_failure(exc)
    err = capfd.readouterr().err.splitlines()
    assert err[0] == "error: --output d: name a new or empty folder"
    assert err[1] == "[export] failed: KeyError: 'variant'"
    assert err[2].strip() == f"traceback and worker output: {tmp_path / 'run' / 'logs' / 'export.log'}"


def test_a_terminal_gets_a_live_line_for_the_running_stage_and_a_pipe_plain_lines():
    import io

    from tailorlm.console_live import live_line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert live_line(io.StringIO()) is None  # CI, `ray job submit`: plain lines
    term = Terminal()
    live = live_line(term)
    live.stage("train")
    live.print("[train] step 10/60 eval_loss 3.1")
    assert live.progress.tasks[0].description == "[train] step 10/60 eval_loss 3.1"
    live.stage(None)
    assert not live.progress.tasks
    live.stop()
    assert "[train] step 10/60 eval_loss 3.1\n" in term.getvalue()


def test_a_stream_handed_out_during_a_session_writes_where_it_used_to_after_it(tmp_path, capfd):
    """Ray's logger keeps the sys.stderr it found at import (the console's): its messages after
    the command ended go to the real stderr, not to a closed file ("--- Logging error ---")."""
    import logging

    with C.session(console_files.LogFiles(str(tmp_path / "run"))):
        handler = logging.StreamHandler(sys.stderr)
    handler.emit(logging.LogRecord("ray", logging.ERROR, __file__, 1, "late message", None, None))
    assert capfd.readouterr().err == "late message\n"


def test_a_run_storage_that_cannot_hold_logs_is_one_line_not_a_traceback(tmp_path, capfd):
    from tailorlm.cli import main

    (tmp_path / "file").write_text("")
    assert main(["data", "jobs/configs/tiny_cpu.yaml", f"run.storage={tmp_path}/file/runs"]) == 1
    err = capfd.readouterr().err
    assert "run.storage" in err and "Not a directory" in err and "Traceback" not in err


def test_a_print_through_rays_print_wrapper_is_still_tailorlms(tmp_path, capfd, monkeypatch):
    """Ray's tqdm_ray replaces print() in the driver once a Ray Data progress bar ran; a stage's
    print then reached sys.stdout from Ray's frame and was filed, not shown (found when the tune
    tests ran before this file in one pytest process)."""
    import builtins

    from ray.experimental import tqdm_ray

    monkeypatch.setattr(builtins, "print", tqdm_ray.safe_print)
    with C.session(console_files.LogFiles(str(tmp_path / "run"))):
        exec("print('[data] kept 10 rows')", {"__name__": "tailorlm.data.stage"})
    assert capfd.readouterr().out.splitlines() == ["[data] kept 10 rows"]


def test_one_paragraph_keeps_our_own_error_over_its_cause():
    """StorageUnavailable is raised `from` the stage's own error: its message names the storage
    (the multi-node outage test looks for it in the job's log), the cause's does not."""
    from tailorlm.storage_watch import StorageUnavailable

    try:
        try:
            raise ConnectionError("Could not connect to the endpoint URL")
        except ConnectionError as exc:
            raise StorageUnavailable("run.storage s3://b/runs/x/data has not answered for 20 s") from exc
    except StorageUnavailable as exc:
        text = T.one_paragraph(exc)
    assert text == "StorageUnavailable: run.storage s3://b/runs/x/data has not answered for 20 s"
