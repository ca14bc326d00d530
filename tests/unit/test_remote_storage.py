"""Models and stages on remote run storage, without a cluster (fsspec's memory:// stands in for
S3): the factory model is published once and copied per node, a copy is never stale, and a stage
whose storage stops answering fails naming it."""

from __future__ import annotations

import threading
import time
import uuid

import fsspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tailorlm.storage_watch as sw
from tailorlm.config import load_config
from tailorlm.models import local_model, resolve_base
from tailorlm.runs import StageDir, is_remote


def _store() -> str:
    return f"memory://store-{uuid.uuid4().hex[:8]}"


def test_factory_model_is_published_once_and_copied_into_the_cache(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILORLM_CACHE", str(tmp_path / "node-cache"))
    monkeypatch.setattr("tailorlm.models.ensure_tiny_model", lambda spec: __import__("pathlib").Path(tiny_model_path))
    cfg = load_config(None)
    storage = _store()
    assert resolve_base(cfg.model, "/local/runs") == tiny_model_path  # local storage: the local build
    uri = resolve_base(cfg.model, storage)
    assert uri.startswith(f"{storage}/_models/llama-") and is_remote(uri)
    fs = fsspec.filesystem("memory")
    published = {p.rsplit("/", 1)[1] for p in fs.find(uri.split("://", 1)[1])}
    assert {"config.json", "model.safetensors", "tokenizer.json", "_READY"} <= published
    # a second resolve (another process, another node) finds it and builds nothing
    monkeypatch.setattr("tailorlm.models.ensure_tiny_model", lambda spec: pytest.fail("built twice"))
    assert resolve_base(cfg.model, storage) == uri
    local = local_model(uri)
    assert local.startswith(str(tmp_path / "node-cache" / "remote"))
    assert (tmp_path / "node-cache" / "remote").exists() and local_model(uri) == local
    # hub ids and local folders pass through
    assert local_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B" and local_model(tiny_model_path) == tiny_model_path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.dictionaries(
        st.sampled_from(["config.json", "model.safetensors", "a/b.txt"]), st.binary(max_size=64), min_size=1
    ),
    changed=st.sampled_from(["config.json", "model.safetensors", "a/b.txt", "new.json"]),
    new=st.binary(max_size=64),
)
def test_a_copy_has_exactly_the_remote_files_and_is_never_stale(tmp_path_factory, files, changed, new):
    """The regression behind naming copies by the files' identity: `train/model/` rewritten by a
    rerun must not be served from the copy of the old one."""
    import os

    before = os.environ.get("TAILORLM_CACHE")  # the session's model cache (conftest): put back after
    os.environ["TAILORLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    fs, root = fsspec.filesystem("memory"), f"/m-{uuid.uuid4().hex[:8]}/model"
    for name, data in files.items():
        fs.pipe(f"{root}/{name}", data)
    uri = f"memory://{root}"
    first = local_model(uri)
    got = {os.path.relpath(os.path.join(d, f), first) for d, _, fs_ in os.walk(first) for f in fs_}
    assert got == set(files)
    assert all(open(os.path.join(first, n), "rb").read() == d for n, d in files.items())
    time.sleep(0.001)  # memory:// stamps files with their creation time
    fs.pipe(f"{root}/{changed}", new)
    second = local_model(uri)
    assert second != first and open(os.path.join(second, changed), "rb").read() == new
    if before is None:
        del os.environ["TAILORLM_CACHE"]
    else:
        os.environ["TAILORLM_CACHE"] = before


def test_an_empty_remote_model_folder_is_an_error_naming_it():
    with pytest.raises(FileNotFoundError, match="memory://nothing-here/model"):
        local_model("memory://nothing-here/model")


def _started(storage: str) -> StageDir:
    sdir = StageDir(f"{storage}/run/data", "data")
    sdir.write_json("_STARTED.json", {})
    return sdir


@pytest.mark.parametrize("sigint", ["python", "ignored"])
def test_a_stage_fails_naming_the_storage_when_it_stops_answering(monkeypatch, sigint):
    """Also with SIGINT ignored (as an earlier test in the suite left it: interrupt_main then did
    nothing and the stage ran on)."""
    import signal

    monkeypatch.setattr(sw, "PROBE_EVERY_S", 0.1)
    if sigint == "ignored":
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        monkeypatch.setattr(sw, "_restore_for_test", old, raising=False)
    sdir = _started(_store())
    threading.Timer(0.5, lambda: sdir.fs.rm(sdir.path + "/_STARTED.json")).start()  # the storage "stops"
    t0 = time.monotonic()
    with pytest.raises(sw.StorageUnavailable, match=r"run.storage memory://.*/run/data has not answered for \d+ s"):
        with sw.watch_storage(sdir, timeout_s=1.0):
            while time.monotonic() - t0 < 30:
                time.sleep(0.05)
    assert time.monotonic() - t0 < 5
    if sigint == "ignored":
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # put back as it was
        signal.signal(signal.SIGINT, sw._restore_for_test)


def test_a_stage_error_while_storage_fails_is_reported_as_storage(monkeypatch):
    monkeypatch.setattr(sw, "PROBE_EVERY_S", 0.1)
    sdir = _started(_store())
    with pytest.raises(sw.StorageUnavailable) as info:
        with sw.watch_storage(sdir, timeout_s=60):
            sdir.fs.rm(sdir.path + "/_STARTED.json")
            time.sleep(0.5)
            raise ConnectionError("a write failed")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_healthy_or_local_storage_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(sw, "PROBE_EVERY_S", 0.1)
    sdir = _started(_store())
    with pytest.raises(ValueError, match="the stage's own error"):
        with sw.watch_storage(sdir, timeout_s=60):
            time.sleep(0.3)
            raise ValueError("the stage's own error")
    with sw.watch_storage(sdir, timeout_s=0.5):
        time.sleep(1.0)  # slower than the timeout, but the storage answers
    local = StageDir(str(tmp_path / "run" / "data"), "data")  # local storage: not watched at all
    with sw.watch_storage(local, timeout_s=0.01):
        time.sleep(0.2)


def test_a_job_on_local_run_storage_is_warned(capsys, monkeypatch):
    from tailorlm.jobs import warn_local_storage

    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    warn_local_storage("jobs/configs/tiny_cpu.yaml", [])
    assert capsys.readouterr().out == ""  # not a job: a laptop run keeps ./runs quietly
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    warn_local_storage("jobs/configs/tiny_cpu.yaml", [])
    out = capsys.readouterr().out
    assert "run.storage ./runs is a path on this node's disk (inside the job's temporary working dir)" in out
    warn_local_storage("jobs/configs/tiny_cpu.yaml", ["run.storage=s3://bucket/runs"])
    warn_local_storage("jobs/configs/tiny_cpu.yaml", ["run.nme=typo"])  # the CLI reports this one
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("storage", ["local", "memory"])
def test_put_twice_replaces_instead_of_nesting(tmp_path, storage):
    """A retried export task uploads its folder again: the second put replaces the first."""
    root = str(tmp_path / "runs") if storage == "local" else _store()
    sdir = StageDir(f"{root}/run/export", "export")
    for content in (b"first", b"second"):
        src = tmp_path / f"src-{content.decode()}" / "model"
        src.mkdir(parents=True)
        (src / "weights.bin").write_bytes(content)
        sdir.put(str(src), "v1/bf16")
    names = [p.rsplit("/export/", 1)[1] for p in sdir.fs.find(sdir.path)]
    assert names == ["v1/bf16/weights.bin"], names
    with sdir.fs.open(sdir.path + "/v1/bf16/weights.bin", "rb") as f:
        assert f.read() == b"second"


def test_a_stage_error_while_a_read_hangs_is_reported_as_storage(monkeypatch):
    """Seen on the cluster: with S3 down, the probe's read hangs in the client's retries (no error
    yet) when Ray Data's own error arrives; that still names the storage."""
    monkeypatch.setattr(sw, "PROBE_EVERY_S", 0.1)
    sdir = _started(_store())
    hang = threading.Event()
    monkeypatch.setattr(sdir.fs, "cat_file", lambda path: hang.wait(30))
    with pytest.raises(sw.StorageUnavailable) as info:
        with sw.watch_storage(sdir, timeout_s=60):
            time.sleep(0.3)
            raise RuntimeError("actor died: could not connect")
    hang.set()
    assert isinstance(info.value.__cause__, RuntimeError) and "requests time out" in str(info.value)
