"""Nothing lost: one run per results directory, write faults fail one model, damaged state."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sweep.ledger import Ledger
from sweep.lock import RunLock
from sweep.run import main, parse_args, rerun_command
from tests.conftest import REPO_ROOT
from tests.sweep.conftest import write_manifest

HOLD_LOCK = """
import sys, time
from pathlib import Path
from sweep.lock import RunLock
lock = RunLock(Path(sys.argv[1]), ["python", "-m", "sweep.run", "held.toml"])
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(out: Path) -> subprocess.Popen[str]:
    """Another process that holds ``out``'s lock until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _ledger(out: Path) -> dict:
    return json.loads((out / "run-latest" / "ledger.json").read_text())


def test_a_second_run_on_a_locked_out_exits_2_naming_the_holder(tmp_path, tiny_checkpoints, capsys):
    out = tmp_path / "results"
    previous = out / "run-latest"
    previous.mkdir(parents=True)
    (previous / "ledger.json").write_text('{"models": {}}')
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    holder = _holder(out)
    try:
        assert main([str(manifest), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another run is using this results directory" in err
        assert f"pid {holder.pid} " in err and "held.toml" in err
        # Nothing was rotated or written.
        assert sorted(p.name for p in out.iterdir()) == [".lock", "run-latest"]
        assert (previous / "ledger.json").read_text() == '{"models": {}}'
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / "results"
    holder = _holder(out)
    with pytest.raises(Exception, match="another run"):
        RunLock(out).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with RunLock(out, ["me"]) as lock:  # the kernel dropped the dead holder's lock
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert lock.path.read_text() == ""  # released: no stale owner text


def test_two_concurrent_sweeps_on_one_out_one_runs_one_is_refused(tmp_path, tiny_checkpoints):
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "sweep.run", str(manifest), "--out", str(out), "--no-progress",
           "--num-cpus", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        results.append((p.returncode, stdout, stderr))
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "another run is using this results directory" in refused
    # One consistent run: its ledger and its artefacts, nothing rotated, nothing half-written.
    assert sorted(p.name for p in out.iterdir()) == [".lock", "run-latest"]
    assert _ledger(out)["models"]["tiny-llama"]["status"] == "ok"
    assert (out / "run-latest" / "records-tiny-llama.parquet").is_file()
    assert not list((out / "run-latest").glob(".*"))


def test_a_write_error_fails_that_model_alone(tmp_path, tiny_checkpoints, monkeypatch, capsys):
    # The disk fills while one model's second batch is written (injected at the file layer):
    # that model fails with the reason and keeps its first batch, the other completes, the
    # summary and a pasteable hint are printed.
    from sweep import parts

    real_write = parts.write_atomic

    def write_atomic(final, write):
        if final.parent.name == ".parts-tiny-gemma2" and not final.name.startswith("00000-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(final))
        return real_write(final, write)

    monkeypatch.setattr(parts, "write_atomic", write_atomic)
    models = {"tiny-llama": tiny_checkpoints["llama"], "tiny-gemma2": tiny_checkpoints["gemma2"]}
    manifest = write_manifest(tmp_path / "m.toml", models)
    out = tmp_path / "results"
    assert main([str(manifest), "--out", str(out), "--no-progress"]) == 1
    entries = _ledger(out)["models"]
    assert entries["tiny-llama"]["status"] == "ok"
    assert entries["tiny-gemma2"]["status"] == "failed"
    assert (
        "writing results failed: OSError: [Errno 28] No space left on device"
        in (entries["tiny-gemma2"]["error"])
    )
    run = out / "run-latest"
    # No file of the failed model but its finished batch (0 of 2), kept for --rerun-failed;
    # nothing half-written, nothing hidden of the model that completed.
    assert [p.name for p in run.glob("*tiny-gemma2*")] == [".parts-tiny-gemma2"]
    assert [p.name for p in run.glob(".*")] == [".parts-tiny-gemma2"]
    kept = sorted(p.name for p in (run / ".parts-tiny-gemma2").iterdir())
    assert [name.split(".", 1)[1] for name in kept] == ["json", "prompts.arrow", "records.arrow"]
    assert all(name.startswith("00000-") for name in kept)
    gemma2 = entries["tiny-gemma2"]
    assert (gemma2["batches_done"], gemma2["batches_total"]) == (1, 2)
    assert (run / "records-tiny-llama.parquet").is_file()
    stdout = capsys.readouterr().out
    assert "1/2 batches finished and kept" in stdout
    assert f"python -m sweep.run {manifest} --out {out} --rerun-failed" in stdout


def test_a_driver_that_stops_early_leaves_no_model_running(tmp_path, tiny_checkpoints, monkeypatch):
    import sweep.cluster

    def probe(*_args, **_kwargs):
        raise RuntimeError("the node probe broke")

    monkeypatch.setattr(sweep.cluster, "probe_nodes", probe)
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    out = tmp_path / "results"
    with pytest.raises(RuntimeError, match="the node probe broke"):
        main([str(manifest), "--out", str(out), "--no-progress"])
    entry = _ledger(out)["models"]["tiny-llama"]
    assert entry["status"] == "failed"
    assert "the driver stopped (RuntimeError: the node probe broke)" in entry["error"]
    assert "--rerun-failed" in entry["error"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"manifest": "m.toml", "models": {"a": {"status": "o', "JSONDecodeError"),
        ("{}", "no 'models' table"),
        ('{"models": {"a": {"status": "done"}}}', "model 'a' has no valid status"),
        ("", "JSONDecodeError"),
    ],
)
def test_a_damaged_ledger_is_one_line_exit_2_and_left_as_it_was(
    tmp_path, tiny_checkpoints, capsys, content, problem
):
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    run = tmp_path / "results" / "run-latest"
    run.mkdir(parents=True)
    (run / "ledger.json").write_text(content)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    argv = [str(manifest), "--out", str(tmp_path / "results"), "--rerun-failed", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the ledger is damaged" in err and problem in err
    assert (run / "ledger.json").read_text() == content
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    with pytest.raises(Exception, match="damaged"):
        Ledger.load(run)


def test_the_rerun_hint_keeps_out_and_address():
    args = parse_args(["m s.toml", "--out", "/data/lens runs", "--address", "10.0.0.1:6379"])
    assert rerun_command(args) == (
        "python -m sweep.run 'm s.toml' --out '/data/lens runs' --address 10.0.0.1:6379 "
        "--rerun-failed"
    )
    assert rerun_command(parse_args(["m.toml"])) == (
        "python -m sweep.run m.toml --out results --rerun-failed"
    )
    assert rerun_command(parse_args(["m.toml", "--prompt-files-anywhere"])).endswith(
        "--prompt-files-anywhere --rerun-failed"
    )


def test_a_local_run_serves_no_metrics_on_all_interfaces():
    # Ray's metrics agent listened on 0.0.0.0 without auth; a local sweep turns metrics off.
    import subprocess as sp

    probe = """
import psutil, ray
from sweep.cluster import connect
connect(None, 1)
ray.get(ray.remote(lambda: 1).remote())
ours = {p.pid: p.name() for p in psutil.Process().children(recursive=True)}
for c in psutil.net_connections(kind="inet"):
    if c.status == "LISTEN" and c.pid in ours:
        print(c.laddr.ip, c.laddr.port, ours[c.pid])
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_enable_metrics_collection"}
    out = sp.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True,
                 text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    listening = [line.split() for line in out.stdout.splitlines()]
    assert listening  # Ray's own servers are there (see README, "Reliability")
    metrics = [r for r in listening if r[0] == "0.0.0.0" and "DashboardAgent" in r[2]]
    assert metrics == [], listening


def test_a_prompt_longer_than_the_context_fails_alone(tmp_path, tiny_checkpoints, capsys):
    # The tiny checkpoints have a context of 256 tokens; one prompt of ~600 fails by itself.
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    long_text = " ".join(["Berlin"] * 600)
    manifest.write_text(
        manifest.read_text() + f'\n[[prompts]]\nid = "too-long"\ntext = "{long_text}"\n'
    )
    out = tmp_path / "results"
    assert main([str(manifest), "--out", str(out), "--no-progress"]) == 0
    entry = _ledger(out)["models"]["tiny-llama"]
    assert entry["status"] == "ok"
    [failure] = entry["prompt_failures"]
    assert (
        failure["prompt_id"] == "too-long"
        and "longer than the model's context of 256" in (failure["error"])
    )
    import pyarrow.parquet as pq

    ids = set(
        pq.read_table(out / "run-latest" / "prompts-tiny-llama.parquet")["prompt_id"].to_pylist()
    )
    assert ids == {"capital-de", "capital-fr", "no-answer"}
    assert "1 prompt(s) refused (longer than the context): too-long" in capsys.readouterr().out


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_full_disk_fails_cleanly_and_the_run_resumes_once_there_is_room(
    tmp_path, tiny_checkpoints, small_filesystem, capsys
):
    # Leave ~36 KiB free: the run's small files fit, a model's results (residuals kept) do not.
    filler = small_filesystem / "filler"
    stat = os.statvfs(small_filesystem)
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 40_000))
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    manifest.write_text(
        manifest.read_text().replace("[sweep]\n", "[sweep]\nkeep_residuals = true\n")
    )
    out = small_filesystem / "results"
    argv = [str(manifest), "--out", str(out), "--no-progress", "--num-cpus", "1"]
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert f"--out {out} --num-cpus 1 --rerun-failed" in errors[0]
    run = out / "run-latest"
    Ledger.load(run)  # whatever the disk refused, the ledger on it is whole
    # Nothing half-written: no file of the model but the batches it finished, if any, whole.
    hidden = [p.name for p in run.glob(".*")]
    assert hidden in ([], [".parts-tiny-llama"])
    assert [p.name for p in run.glob("*tiny-llama*")] == hidden
    for part in run.glob(".parts-tiny-llama/*"):
        assert not part.name.startswith(".")  # no temp file of an unfinished write
    filler.unlink()  # make room, then resume as the message says
    assert main([*argv, "--rerun-failed"]) == 0
    assert _ledger(out)["models"]["tiny-llama"]["status"] == "ok"
    assert (run / "records-tiny-llama.parquet").is_file()
    assert not list(run.glob(".*"))  # finished: the parts are assembled and gone
