"""Installing netmemfs as Python and C users expect (issue 17, item 6): a fresh
virtualenv with only `pip install <checkout>` runs the README's mmap example and builds
and runs a C program against the libnetmem built into the package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import ServerProc, read_line, wait_for
from tests.test_70_anon import ROOT

MiB = 1 << 20
BIN = Path(sys.executable).parent  # this venv's console scripts
INSTALL_TIMEOUT_S = 900  # dependencies come from pip's cache once scripts/setup has run


def _checkout_copy(into: Path) -> Path:
    """The checkout's files (tracked, and new ones not ignored) copied to into: what a
    user who cloned it has, without this checkout's venv and build products."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, names):
        src, dst = ROOT / os.fsdecode(name), into / os.fsdecode(name)
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            dst.chmod(src.stat().st_mode & 0o777)
    return into


def _readme_block(after: str) -> str:
    """The first ```sh block of the README after the text `after`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    m = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert m, f"no sh block after {after!r} in the README"
    return m.group(1)


def test_a_fresh_virtualenv_with_pip_install_of_the_checkout(tmp_path: Path) -> None:
    src = _checkout_copy(tmp_path / "src")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("NETMEMFS_BIN", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"
    env["HOME"] = str(tmp_path / "home")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    (tmp_path / "home").mkdir()
    r = subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", str(src)],
        capture_output=True,
        text=True,
        env=env,
        timeout=INSTALL_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for program in ("netmemfs", "netmemfs-server"):
        r = subprocess.run([str(bin_dir / program), "--version"], capture_output=True, text=True)
        assert r.returncode == 0 and program in r.stdout, r.stderr

    # The README's first command (its install step done above) and its mmap example, run
    # as written from a directory whose .venv is the fresh one.
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(env_dir)
    first = (ROOT / "README.md").read_text().split("```sh\n", 1)[1].splitlines()[0]
    mount = first.split("&&", 1)[1].strip()  # after `bash scripts/setup`
    assert mount == "mkdir -p ~/nm && .venv/bin/netmemfs mount ~/nm", mount
    example = _readme_block("Any process can then map")
    r = subprocess.run(["bash", "-c", mount], cwd=work, env=env, capture_output=True, text=True)
    nm = tmp_path / "home" / "nm"
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: os.path.ismount(nm), "the mount")
        # The example's python3 line, then a look at the file before its umount line.
        python_part, umount_part = example.rsplit("\n.venv/bin/netmemfs umount", 1)
        r = subprocess.run(
            ["bash", "-c", python_part], cwd=work, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        with open(nm / "seg0", "rb") as f:
            assert f.read(5) == b"hello"
        r = subprocess.run(
            ["bash", "-c", ".venv/bin/netmemfs umount" + umount_part],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    finally:
        if os.path.ismount(nm):
            subprocess.run(["fusermount3", "-uz", str(nm)], capture_output=True)

    # A C program, built against the package's libnetmem as `netmemfs config` says, run
    # with the venv on PATH (where the library finds its agent), against the venv's server.
    flags = subprocess.run(
        [str(bin_dir / "netmemfs"), "config", "--cflags", "--libs"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.split()
    exe = tmp_path / "anon_test"
    source = ROOT / "tests" / "c" / "anon_test.c"
    gcc = ["gcc", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "tests" / "c"), "-o", str(exe)]
    subprocess.run([*gcc, str(source), *flags], check=True)
    libdir = subprocess.run(
        [str(bin_dir / "netmemfs"), "config", "--libdir"], capture_output=True, text=True
    ).stdout.strip()
    ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    assert f"{libdir}/libnetmem.so.1" in ldd, ldd  # the package's, not a system-wide one
    with subprocess.Popen(
        [str(bin_dir / "netmemfs-server"), "--listen", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as server:
        try:
            assert server.stdout is not None
            line = read_line(server.stdout, 30).decode()
            m = re.search(r"listening on (\S+:\d+)", line)
            assert m, line
            for how in ("write", "verify"):
                argv = [str(exe), how, m.group(1), "c", str(MiB), str(MiB), "1"]
                r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
                assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
        finally:
            server.kill()


def test_fstab_lines_mount_through_mount_8(tmp_path: Path, server: ServerProc) -> None:
    """`mount -t fuse.netmemfs` (mount(8) -> mount.fuse -> `netmemfs SOURCE MOUNTPOINT
    -o ...`, as for sshfs) from an fstab (mount -T: a file of the test's, not the
    machine's), with the options systemd and fstab add; an unknown option is refused in
    one line."""
    if os.geteuid() != 0 or shutil.which("mount.fuse3") is None:
        pytest.skip("mount(8) of a FUSE type needs root and fuse3's mount.fuse3")
    mnt, cache = tmp_path / "nm", tmp_path / "cache"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    options = f"_netdev,nofail,noauto,x-systemd.automount,cache_dir={cache},timeout=10"
    fstab.write_text(f"{server.address} {mnt} fuse.netmemfs {options} 0 0\n")
    # mount.fuse runs `netmemfs` with no PATH of its own (the shell's default), as at
    # boot: docs/operations.md links it into /usr/local/bin; so does this test, for
    # its length, unless something is there already.
    link = Path("/usr/local/bin/netmemfs")
    if link.exists() or link.is_symlink():
        pytest.skip(f"{link} exists: this test would not know which netmemfs it ran")
    link.symlink_to(BIN / "netmemfs")
    try:
        _mount_from_fstab(tmp_path, server, fstab, mnt, cache, options)
    finally:
        link.unlink()


def _mount_from_fstab(
    tmp_path: Path, server: ServerProc, fstab: Path, mnt: Path, cache: Path, options: str
) -> None:
    env = dict(os.environ)
    r = subprocess.run(
        ["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True, env=env, timeout=60
    )
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert os.path.ismount(mnt)
        (mnt / "f").write_bytes(b"from fstab")
        r = subprocess.run(
            [str(BIN / "netmemfs"), "umount", str(mnt), "--cache-dir", str(cache)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    fstab.write_text(f"{server.address} {mnt} fuse.netmemfs cache_dir={cache},bogus=1 0 0\n")
    r = subprocess.run(
        ["mount", "-T", str(fstab), str(mnt)], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode != 0
    assert "unknown mount option 'bogus=1'" in r.stderr, r.stderr
    assert not os.path.ismount(mnt)
    # The helper mount(8) runs for type netmemfs takes the same line.
    r = subprocess.run(
        [str(BIN / "mount.netmemfs"), server.address, str(mnt), "-f", "-o", options],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr


def test_the_documented_systemd_units_verify(tmp_path: Path) -> None:
    """docs/operations.md's units, with its /opt/netmemfs prefix made this venv's, pass
    `systemd-analyze verify` without a word."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("NETMEMFS_REQUIRE_OPS_TOOLS") == "1":
            pytest.fail("no systemd-analyze: apt-get install systemd")
        pytest.skip("no systemd-analyze (package systemd)")
    text = (ROOT / "docs" / "operations.md").read_text()
    units = re.findall(r"^# /etc/systemd/system/(\S+)\n(.*?)```", text, re.S | re.M)
    assert {name for name, _ in units} >= {"netmemfs-server.service", "mnt-nm.mount"}, units
    prefix = str(BIN.parent)
    paths = []
    for name, body in units:
        path = tmp_path / name
        path.write_text(body.replace("/opt/netmemfs", prefix))
        paths.append(str(path))
    r = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
