"""Nothing lost, part 3 (issue 19), by fault injection on tiny data: one run per folder
(trainer and preprocessing stages), a fallback that keeps the good checkpoint, a converter
that stays inside the list file's folder, NaN/inf in .b2nd refused by name, a relaunch
with another configuration refused by name, list files named with file and line, a full
disk during a .b2nd conversion and a signal during a save each said in one line."""
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data_loader_ssl as dl
import main_desd
import splitting_to_patches as stage3
import volume_io
from common import atomic, checkpoints, listfile, lock
from test_preprocess import run_with_full_disk, write_volume
from test_train import TINY, env, make_subvolumes

pytestmark = pytest.mark.slow  # fault injection in subprocesses: seconds to a minute each

ROOT = Path(__file__).resolve().parents[1]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temps(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if atomic.is_temp_name(p.name))


def trainer_argv(data, out, *extra):
    return ["--data_path", str(data), "--list_path", "list.txt", "--output_dir", str(out),
            *TINY, "--num_workers", "0", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_subvolumes(tmp_path_factory.mktemp("subvolumes"), 4, seed=0)


def wait_for(path, proc, seconds=120):
    """Wait until `path` exists (written by the holder once it runs); fail if `proc` ends."""
    t0 = time.time()
    while not Path(path).exists():
        if proc.poll() is not None:
            raise AssertionError(f"holder ended with {proc.returncode}:\n"
                                 f"{proc.stdout.read()[-2000:]}\n{proc.stderr.read()[-3000:]}")
        assert time.time() - t0 < seconds, "holder never started"
        time.sleep(0.1)


# a script that runs a command and blocks inside its work until told to go on: the holder
HOLDER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import {module} as target

    orig = getattr(target, {fn!r})

    def hold(*args, **kw):
        open({started!r}, "w").close()
        while not os.path.exists({go!r}):
            time.sleep(0.05)
        return orig(*args, **kw)

    setattr(target, {fn!r}, hold)
    sys.exit(target.main({argv!r}))
""")


def start_holder(tmp_path, module, fn, argv):
    started, go = tmp_path / f"{module}.started", tmp_path / f"{module}.go"
    code = HOLDER.format(root=str(ROOT), module=module, fn=fn, argv=[str(a) for a in argv],
                         started=str(started), go=str(go))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env(), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(started, proc)
    return proc, go


# ------------------------------------------------------------------------- 1. one run per folder

def test_second_trainer_on_one_output_dir_is_refused_at_once(data, tmp_path, monkeypatch, capsys):
    """Two trainers on one --output_dir both exited 0 and left each other's checkpoints."""
    out = tmp_path / "run"
    holder, go = start_holder(tmp_path, "main_desd", "train_one_epoch",
                              trainer_argv(data, out, "--epochs", "2", "--seed", "1"))
    try:
        def never(*a, **k):
            raise AssertionError("the second run got as far as building its networks")
        monkeypatch.setattr(main_desd, "build_models", never)
        t0 = time.time()
        rc = main_desd.main(trainer_argv(data, out, "--epochs", "2", "--seed", "2"))
        err = capsys.readouterr().err
        assert rc == 1 and time.time() - t0 < 10
        assert str(out) in err and f"PID {holder.pid}" in err and socket.gethostname() in err
        assert "--output_dir" in err                      # what to do instead
    finally:
        go.touch()
        stdout, stderr = holder.communicate(timeout=300)
    assert holder.returncode == 0, stderr[-3000:]
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["seed"] == 1          # the holder's run only
    assert torch.load(out / "checkpoint_prev.pth", weights_only=True)["args"]["seed"] == 1
    assert temps(out) == [] and not (out / lock.LOCK_NAME).exists()  # released at the end


def test_a_killed_holder_leaves_no_lock_behind(data, tmp_path):
    out = tmp_path / "run"
    holder, _ = start_holder(tmp_path, "main_desd", "train_one_epoch",
                             trainer_argv(data, out, "--epochs", "1"))
    holder.kill()
    holder.communicate(timeout=60)
    assert main_desd.main(trainer_argv(data, out, "--epochs", "1", "--max_iters_per_epoch", "1")) == 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_lock_without_lock_support_uses_host_and_pid(tmp_path, monkeypatch):
    """Where the file system refuses locks (NFS without a lock daemon), the lock file's
    host and PID decide: a dead process on this host is stale, anything else is refused."""
    import fcntl

    def no_locks(*a, **k):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    folder = tmp_path / "f"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / lock.LOCK_NAME).write_text(f"{socket.gethostname()} {dead.pid} old_command\n")
    with lock.hold_folder(folder, "test"):  # stale: taken over
        assert f" {os.getpid()} " in (folder / lock.LOCK_NAME).read_text()
    assert not (folder / lock.LOCK_NAME).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / lock.LOCK_NAME).write_text(f"{socket.gethostname()} {alive.pid} other\n")
        with pytest.raises(lock.FolderInUse, match=f"PID {alive.pid}"):
            with lock.hold_folder(folder, "test"):
                pass
    finally:
        alive.kill()
        alive.wait()
    (folder / lock.LOCK_NAME).write_text("another-host 12 other\n")
    with pytest.raises(lock.FolderInUse, match="another-host") as e:
        with lock.hold_folder(folder, "test"):
            pass
    assert lock.LOCK_NAME in str(e.value)  # says which file to delete if that run is gone


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    """A tiny DeepLesion set and its three stages' outputs."""
    from synthetic_ct import make_deeplesion_set
    import DL_save_nifti as stage1
    import re_spacing_ITK as stage2
    root = tmp_path_factory.mktemp("stages")
    make_deeplesion_set(root, n_series=1, size=12, seed=3, n_slices=(14, 14))
    assert stage1.main(["--png_dir", str(root / "Images_png"), "--info_csv",
                        str(root / "DL_info.csv"), "--output_dir", str(root / "nifti"),
                        "--num_workers", "1"]) == 0
    assert stage2.main(["--in_dir", str(root / "nifti"), "--output_dir", str(root / "spacing"),
                        "--num_workers", "1"]) == 0
    return root


STAGES = {  # module, the function its tasks run, argv (OUT is the folder in question)
    "DL_save_nifti": ("convert_run", lambda r, o: ["--png_dir", r / "Images_png", "--info_csv",
                                                   r / "DL_info.csv", "--output_dir", o]),
    "re_spacing_ITK": ("resample_file", lambda r, o: ["--in_dir", r / "nifti", "--output_dir", o]),
    "splitting_to_patches": ("split_file", lambda r, o: ["--in_dir", r / "spacing", "--output_dir",
                                                         o, "--list_file", o / "list.txt"]),
}


@pytest.mark.parametrize("module", list(STAGES))
def test_second_copy_of_a_stage_is_refused(stage_data, tmp_path, module, capsys):
    fn, argv = STAGES[module]
    out = tmp_path / "out"
    args = [*argv(stage_data, out), "--num_workers", "1"]
    holder, go = start_holder(tmp_path, module, fn, args)
    try:
        rc = __import__(module).main([str(a) for a in args])
        err = capsys.readouterr().err
        assert rc == 1 and str(out) in err and f"PID {holder.pid}" in err
        assert "0 done" not in err            # refused before any task, not run twice
    finally:
        go.touch()
        _, stderr = holder.communicate(timeout=300)
    assert holder.returncode == 0, stderr[-2000:]
    assert re.search(r"[1-9]\d* done", stderr), stderr[-2000:]
    assert not (out / lock.LOCK_NAME).exists()


def test_second_converter_on_one_list_is_refused(stage_data, tmp_path, capsys):
    shutil.copytree(stage_data / "spacing", tmp_path / "in")
    assert stage3.main(["--in_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "p"),
                        "--list_file", str(tmp_path / "list.txt"), "--num_workers", "1"]) == 0
    args = ["--convert_to", "npy", "--list_file", tmp_path / "list.txt", "--num_workers", "1"]
    holder, go = start_holder(tmp_path, "splitting_to_patches", "convert_file", args)
    try:
        assert stage3.main([str(a) for a in args]) == 1
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and "in use" in err
    finally:
        go.touch()
        _, stderr = holder.communicate(timeout=300)
    assert holder.returncode == 0, stderr[-2000:]
    assert all(line.endswith(".npy") for line in (tmp_path / "list.txt").read_text().split())


# ------------------------------------------------------------------------- 2. the fallback

def flip_inside(path):
    """Damage a checkpoint inside, at the same size (its CRCs catch it)."""
    raw = bytearray(Path(path).read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4096] = bytes(4096)
    Path(path).write_bytes(bytes(raw))


def test_damaged_checkpoint_is_set_aside_not_promoted(data, tmp_path, capsys):
    """After a fallback the next save hard-linked the corrupt checkpoint.pth into
    checkpoint_prev.pth: one more fault and nothing was left to resume from."""
    out = tmp_path / "fb"
    argv = trainer_argv(data, out, "--max_iters_per_epoch", "1")
    assert main_desd.main([*argv, "--epochs", "2"]) == 0
    flip_inside(out / "checkpoint.pth")
    good_prev, damaged = sha(out / "checkpoint_prev.pth"), sha(out / "checkpoint.pth")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="checkpoint.pth.damaged"):
        assert main_desd.main([*argv, "--epochs", "2"]) == 0   # redoes epoch 1
    assert "checkpoint_prev.pth at epoch 1" in capsys.readouterr().out
    assert sha(out / "checkpoint_prev.pth") == good_prev        # the good one stays previous
    assert sha(out / "checkpoint.pth.damaged") == damaged       # set aside, under its name
    assert checkpoints.load_checkpoint_with_fallback(out / "checkpoint.pth")[0]["epoch"] == 2
    assert checkpoints.load_checkpoint_with_fallback(out / "checkpoint_prev.pth")[0]["epoch"] == 1


# ------------------------------------------------------------------------- 3. the converter's folders

def nifti(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(-1000, 1000, (14, 16, 16)).astype(np.int16)
    write_volume(path, arr, spacing_xyz=(1.0, 1.0, 1.0))


def test_converter_refuses_entries_outside_the_list_folder(tmp_path, capsys):
    data, victim = tmp_path / "data", tmp_path / "victim"
    nifti(data / "p" / "a_dep0.nii.gz")
    nifti(victim / "x.nii.gz", 1)
    nifti(tmp_path / "elsewhere" / "y.nii.gz", 2)
    bait = victim / ".keep.nii.gz.tmp-999999999.nii.gz"   # looks like a dead run's temporary
    bait.write_bytes(b"not a temporary of ours")
    absolute = str(tmp_path / "elsewhere" / "y.nii.gz")
    lst = data / "list.txt"
    lst.write_text(f"p/a_dep0.nii.gz\n../victim/x.nii.gz\n{absolute}\n")
    before = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    rc = stage3.main(["--convert_to", "b2nd", "--list_file", str(lst), "--num_workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "../victim/x.nii.gz" in err and absolute in err and str(data) in err
    after = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()
             and p.name != lock.LOCK_NAME}
    assert after == before                                 # nothing written, nothing deleted


def test_converter_keeps_absolute_entries_and_cleans_only_its_own_temps(tmp_path):
    data = tmp_path / "data"
    for k in (0, 1):
        nifti(data / "p" / f"a_dep{k}.nii.gz", k)
    lst = data / "list.txt"
    absolute = str(data / "p" / "a_dep1.nii.gz")
    lst.write_text(f"p/a_dep0.nii.gz\n{absolute}\n")
    ours = data / "p" / ".a_dep0.b2nd.tmp-999999999.b2nd"      # a dead conversion's leftover
    foreign = data / "p" / ".notes.txt.tmp-999999999.txt"       # someone else's file
    ours.write_bytes(b"half")
    foreign.write_bytes(b"keep me")
    assert stage3.main(["--convert_to", "b2nd", "--list_file", str(lst), "--num_workers", "1"]) == 0
    assert lst.read_text().split() == ["p/a_dep0.b2nd", absolute[:-len(".nii.gz")] + ".b2nd"]
    assert not ours.exists() and foreign.read_bytes() == b"keep me"
    assert np.array_equal(volume_io.B2ndVolume(data / "p" / "a_dep1.b2nd").read(),
                          dl.load_subvolume(absolute))


# ------------------------------------------------------------------------- 4. NaN/inf in .b2nd

def write_unchecked_b2nd(monkeypatch, array, path):
    """A float .b2nd holding NaN/inf, as another tool could write it."""
    with monkeypatch.context() as m:
        m.setattr(volume_io, "refuse_non_finite", lambda *a, **k: None)
        volume_io.write_b2nd(array, path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_write_b2nd_refuses_non_finite_input(tmp_path, bad):
    a = np.zeros((20, 20, 6), np.float32)
    a[3, 4, 5] = bad
    with pytest.raises(ValueError, match=r"1 NaN or inf voxel") as e:
        volume_io.write_b2nd(a, tmp_path / "v.b2nd")
    assert "v.b2nd" in str(e.value) and "reads back" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_b2nd_is_refused_by_name(tmp_path, monkeypatch):
    a = np.zeros((100, 60, 6), np.float32)
    a[80:90, 5, 2] = np.nan
    a[81, 6, 3] = np.inf
    path = tmp_path / "f_dep0.b2nd"
    write_unchecked_b2nd(monkeypatch, a, path)
    with pytest.raises(volume_io.VolumeError, match="11 NaN or inf") as e:
        volume_io.B2ndVolume(path).read()
    assert str(path) in str(e.value)
    with pytest.raises(volume_io.VolumeError, match=str(path)):
        dl.open_subvolume(str(path)).window(slice(70, 100), slice(0, 20))
    with pytest.raises(volume_io.VolumeError, match=str(path)):
        dl.load_subvolume(str(path))
    # a window away from them reads (only the chunks it decodes are checked)
    assert np.array_equal(dl.open_subvolume(str(path)).window(slice(0, 40), slice(0, 40)),
                          a[:40, :40])


def test_non_finite_b2nd_stops_the_trainer_naming_the_file(tmp_path, monkeypatch, capsys):
    """Through the trainer it surfaced as 'non-finite loss at iteration 0', no file named."""
    (tmp_path / "d").mkdir()
    root = make_subvolumes(tmp_path / "d", 3, seed=4)
    bad = root / "DL_patches_v2" / "nan_dep0.b2nd"
    write_unchecked_b2nd(monkeypatch, np.full((50, 44, 12), np.nan, np.float32), bad)
    with open(root / "list.txt", "a") as f:
        f.write("DL_patches_v2/nan_dep0.b2nd\n")
    rc = main_desd.main(trainer_argv(root, tmp_path / "out", "--epochs", "1"))
    err = capsys.readouterr().err
    assert rc == 1 and str(bad) in err and "NaN or inf" in err
    assert "non-finite loss" not in err


# ------------------------------------------------------------------------- 5. another configuration

@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_epoch")
    assert main_desd.main(trainer_argv(data, out, "--epochs", "1", "--max_iters_per_epoch", "1")) == 0
    return out


@pytest.mark.parametrize("flags, said", [
    (["--arch", "res3d18"], ["--arch res3d18", "res3d10"]),
    (["--out_dim", "48"], ["--out_dim 48", "32"]),
    (["--optimizer", "sgd"], ["--optimizer sgd", "adamw"]),
    (["--out_dim", "48", "--optimizer", "lars"], ["--out_dim 48", "--optimizer lars"]),
])
def test_relaunch_with_another_configuration_is_refused_by_name(one_epoch, data, tmp_path, flags,
                                                               said, capsys):
    out = tmp_path / "relaunch"
    shutil.copytree(one_epoch, out)
    digest = sha(out / "checkpoint.pth")
    capsys.readouterr()
    rc = main_desd.main(trainer_argv(data, out, "--epochs", "2", "--max_iters_per_epoch", "1",
                                     *flags))
    captured = capsys.readouterr()
    assert rc == 1 and "resumed from" not in captured.out
    assert "Traceback" not in captured.err and "state_dict" not in captured.err
    for text in said + [str(out / "checkpoint.pth"), "--output_dir"]:
        assert text in captured.err, text
    assert sha(out / "checkpoint.pth") == digest
    # other flags (here the learning rate and the epochs) may change: that resumes
    assert main_desd.main(trainer_argv(data, out, "--epochs", "2", "--max_iters_per_epoch", "1",
                                       "--lr", "0.001")) == 0


# ------------------------------------------------------------------------- 6. list files

def two_files(folder):
    (folder / "p").mkdir(parents=True, exist_ok=True)
    for name in ("a.npy", "b.npy"):
        np.save(folder / "p" / name, np.zeros((4, 4, 4), np.int16))


def test_list_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    two_files(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"p/a.npy\np/b\xff\xfe.npy\n")
    with pytest.raises(ValueError, match=r"list.txt line 2") as e:
        listfile.read_list_file(lst)
    assert str(lst) in str(e.value) and "UTF-8" in str(e.value)


def test_list_file_with_a_byte_order_mark_reads(tmp_path):
    two_files(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbfp/a.npy\r\np/b.npy\r\n")
    assert [Path(p) for p in listfile.read_list_file(lst)] == [tmp_path / "p" / "a.npy",
                                                              tmp_path / "p" / "b.npy"]


def test_duplicate_list_entries_are_refused_with_their_lines(tmp_path, capsys):
    two_files(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text("p/a.npy\np/b.npy\n./p/a.npy\n")
    with pytest.raises(ValueError, match=r"more than once") as e:
        listfile.read_list_file(lst)
    assert "p/a.npy" in str(e.value) and "lines 1 and 3" in str(e.value)
    # the converter reads by the same rule: refused, nothing converted
    nifti(tmp_path / "q" / "c_dep0.nii.gz")
    lst2 = tmp_path / "l2.txt"
    lst2.write_text("q/c_dep0.nii.gz\nq/c_dep0.nii.gz\n")
    assert stage3.main(["--convert_to", "npy", "--list_file", str(lst2), "--num_workers", "1"]) == 1
    assert "more than once" in capsys.readouterr().err
    assert not (tmp_path / "q" / "c_dep0.npy").exists()


# ------------------------------------------------------------------------- 7. messages

def test_full_disk_during_b2nd_conversion_is_said(tmp_path):
    """blosc2 said 'RuntimeError: Error while creating the NDArray'."""
    folder = tmp_path / "p"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_volume(folder / "v_dep0.nii.gz", rng.integers(-1000, 1000, (24, 64, 64)).astype(np.int16),
                 spacing_xyz=(1.0, 1.0, 1.0))
    lst = tmp_path / "list.txt"
    lst.write_text("p/v_dep0.nii.gz\n")
    proc = run_with_full_disk("splitting_to_patches", ["--convert_to", "b2nd", "--list_file", lst,
                                                       "--num_workers", "1"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "v_dep0.b2nd was not written completely" in proc.stderr
    assert "is the disk full?" in proc.stderr and "RuntimeError" not in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["v_dep0.nii.gz"]
    assert lst.read_text() == "p/v_dep0.nii.gz\n"


SIGNALLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    import main_desd

    SIG, COUNT, EPOCH, WHERE = {sig}, {count}, {epoch}, {where!r}
    orig_save, orig_epoch = torch.save, main_desd.train_one_epoch

    class Interrupted:  # a file whose third write brings the signal(s), mid-save
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += 1
            if self.n == 3:
                for _ in range(COUNT):
                    os.kill(os.getpid(), SIG)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def save(obj, f, *args, **kw):
        if WHERE == "save" and isinstance(obj, dict) and obj.get("epoch") == EPOCH + 1:
            f = Interrupted(f)
        return orig_save(obj, f, *args, **kw)

    def epoch_hook(epoch, *args, **kw):
        if WHERE == "train" and epoch == EPOCH:
            os.kill(os.getpid(), SIG)
        return orig_epoch(epoch, *args, **kw)

    torch.save = save
    main_desd.train_one_epoch = epoch_hook
    sys.exit(main_desd.main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig, count, epoch, where, kept", [
    (signal.SIGTERM, 1, 0, "save", 1),   # the save finishes, then the run stops
    (signal.SIGINT, 1, 1, "save", 2),
    (signal.SIGINT, 2, 1, "save", 1),    # again: the save is abandoned, its file removed
    (signal.SIGTERM, 2, 0, "save", 0),
    (signal.SIGINT, 1, 1, "train", 1),   # while training: the last checkpoint stays
])
def test_signal_during_a_save_says_what_was_kept(data, tmp_path, sig, count, epoch, where, kept):
    script = tmp_path / "signaller.py"
    script.write_text(SIGNALLER.format(root=str(ROOT), sig=int(sig), count=count, epoch=epoch,
                                       where=where))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), *trainer_argv(
        data, out, "--epochs", "3", "--max_iters_per_epoch", "1", "--saveckp_freq", "0")],
        env=env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + sig, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and "enforce fail" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("main_desd.py: stopped by " + signal.Signals(sig).name)
    if kept:
        assert f"checkpoint.pth (epoch {kept})" in lines[-1]
        assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == kept
    else:
        assert "no checkpoint" in lines[-1] and not (out / "checkpoint.pth").exists()
    assert temps(out) == [] and not (out / lock.LOCK_NAME).exists()
