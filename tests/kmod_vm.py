"""Boot Debian's kernel in qemu with the module and run tests/kmod_guest.py in it.

Used by tests/test_80_kmod.py, and by hand:

    .venv/bin/python -m tests.kmod_vm          # build, boot, print the guest's console

The guest is this machine's kernel package (linux-image-amd64), not the running kernel:
ours cannot load modules. The initramfs is made here: busybox, the virtio and 9p modules
from /lib/modules/<version>, netmem.ko, and an /init that loads them, mounts this
machine's root read-only over 9p at /host, and runs the project's own Python there
(chroot), so the guest runs the real server, daemon and test program on its own loopback.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
# Load order matters: each after what it needs (modules.dep gives the needs).
WANTED_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "fuse"]
VM_TIMEOUT_S = 1200  # the guest takes about 510 s here alone; more on a loaded machine
# The module's timeout_ms in the guest: long enough for a loaded machine emulating the
# guest in software, short enough for the stalled-daemon check to finish soon.
GUEST_TIMEOUT_MS = 10000


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path
    headers: Path
    modules: Path


class Missing(Exception):
    """Something the guest needs is not installed; the message names the package."""


def find_kernels() -> list[Kernel]:
    """Every Debian kernel whose image, headers and modules are all installed, oldest
    first (Debian 12: 6.1 from linux-image-amd64, 6.12 from linux-image-6.12.*)."""
    found = []
    for image in Path("/boot").glob("vmlinuz-*-amd64"):
        version = image.name.removeprefix("vmlinuz-")
        headers = Path(f"/usr/src/linux-headers-{version}")
        modules = Path(f"/lib/modules/{version}")
        if headers.is_dir() and (modules / "modules.dep").is_file():
            found.append(Kernel(version, image, headers, modules))
    return sorted(found, key=lambda k: [int(x) for x in re.findall(r"\d+", k.version)])


def find_kernel() -> Kernel:
    """The newest Debian kernel whose image, headers and modules are all installed."""
    kernels = find_kernels()
    if not kernels:
        raise Missing(
            "no Debian kernel with headers and modules: apt-get install linux-image-amd64 "
            "linux-headers-amd64"
        )
    return kernels[-1]


def module_order(kernel: Kernel, names: list[str]) -> list[Path]:
    """The .ko files for names and everything they need, needs first."""
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, needs = line.partition(":")
        deps[path] = needs.split()

    def name_of(path: str) -> str:
        return Path(path).name.split(".ko")[0].replace("-", "_")

    by_name = {name_of(p): p for p in deps}
    builtin_file = kernel.modules / "modules.builtin"
    builtin = (
        {name_of(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    )
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for need in deps.get(path, []):
            visit(need)
        order.append(path)

    for name in names:
        if name in builtin:
            continue  # built into this kernel (6.12: virtio_pci, fuse)
        if name not in by_name:
            raise Missing(f"module {name} is not in {kernel.modules}")
        visit(by_name[name])
    return [kernel.modules / p for p in order]


def build_module(kernel: Kernel, out: Path, *, sparse: bool = False) -> Path:
    """netmem.ko for kernel, built (W=1, -Werror) in a copy of kmod/ under out, so that
    builds for two kernels never share objects and the checkout stays clean. With
    sparse, the build also runs sparse (C=2) and any line it prints fails it."""
    src = out / f"kmod-{kernel.version}" / "kmod"
    src.mkdir(parents=True)
    for name in ("netmem.c", "Kbuild", "Makefile"):
        shutil.copy(ROOT / "kmod" / name, src / name)
    (src.parent / "include").mkdir()
    shutil.copy(ROOT / "include" / "netmem_uapi.h", src.parent / "include")
    r = subprocess.run(
        ["make", "-s", "-C", str(src), f"KDIR={kernel.headers}", *(["C=2"] if sparse else [])],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise AssertionError(f"kmod/ does not build against {kernel.headers}:\n{r.stderr}")
    said = [line for line in r.stderr.splitlines() if "BTF generation" not in line]
    if sparse and said:
        raise AssertionError(f"sparse against {kernel.headers}:\n" + "\n".join(said))
    return src / "netmem.ko"


def build_test_program(out: Path) -> Path:
    binary = out / "kmod_test"
    subprocess.run(
        [
            "gcc",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{ROOT / 'include'}",
            "-pthread",
            "-o",
            str(binary),
            str(ROOT / "tests/c/kmod_test.c"),
        ],
        check=True,
    )
    return binary


INIT = """#!/bin/busybox sh
echo "KMOD-VM: init started"
/bin/busybox mkdir -p /proc /sys /dev /host
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /mods/order); do
    /bin/busybox insmod /mods/$m || echo "KMOD-VM: insmod $m failed"
done
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host \\
    || echo "KMOD-VM: cannot mount the host's root"
for d in proc sys dev; do /bin/busybox mount --bind /$d /host/$d; done
/bin/busybox mount -t tmpfs tmp /host/run
/bin/busybox ip link set lo up
/bin/busybox insmod /netmem.ko timeout_ms=@TIMEOUT_MS@ || echo "KMOD-VM: insmod netmem.ko failed"
echo "KMOD-VM: booted"
/bin/busybox chroot /host /bin/sh -c 'cd @ROOT@ && TMPDIR=/run HOME=/run \\
    PYTHONDONTWRITEBYTECODE=1 exec @PYTHON@ -m tests.kmod_guest @TEST_BIN@ @ONLY@'
echo "KMOD-VM: guest exited $?"
/bin/busybox poweroff -f
"""


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def build_initramfs(
    kernel: Kernel, module: Path, test_bin: Path, out: Path, only: list[str] | None = None
) -> Path:
    if not BUSYBOX.is_file():
        raise Missing("no static busybox: apt-get install busybox-static")
    mods = module_order(kernel, WANTED_MODULES)
    init = (
        INIT.replace("@TIMEOUT_MS@", str(GUEST_TIMEOUT_MS))
        .replace("@ROOT@", str(ROOT))
        .replace("@PYTHON@", sys.executable)
        .replace("@TEST_BIN@", str(test_bin))
        .replace("@ONLY@", " ".join(only or []))
    )
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [
        ("bin", d, b""),
        ("mods", d, b""),
        ("init", x, init.encode()),
        ("bin/busybox", x, BUSYBOX.read_bytes()),
        ("netmem.ko", f, module.read_bytes()),
        ("mods/order", f, "\n".join(m.name for m in mods).encode() + b"\n"),
    ]
    entries += [(f"mods/{m.name}", f, m.read_bytes()) for m in mods]
    path = out / "initramfs.cpio"
    path.write_bytes(_cpio(entries))
    return path


def qemu_command(kernel: Kernel, initramfs: Path) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise Missing("no qemu-system-x86_64: apt-get install qemu-system-x86")
    # Software emulation: this machine's /dev/kvm (nested) hung the boot. One host
    # thread for both vCPUs (thread=single): with a thread per vCPU (MTTCG), code the
    # kernel patches on one vCPU (jump labels, static calls) was once seen still
    # running unpatched on the other, an "Oops: int3" at boot before any module was
    # loaded (CI of 2026-12-07, 6.12); one thread runs each vCPU in turn, so a patch
    # is seen by both before either runs again. Both vCPUs still run the module's
    # code concurrently as far as the guest can tell. The guest takes about 510 s
    # here instead of about 310 s.
    return [
        qemu,
        "-accel",
        "tcg,thread=single",
        "-m",
        "1024",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(kernel.image),
        "-initrd",
        str(initramfs),
        "-append",
        # init_on_alloc=0: memory the module hands out unzeroed shows (6.1 and 6.12
        # boot with it on by default, which would hide a leak).
        "console=ttyS0 panic=-1 oops=panic quiet loglevel=4 init_on_alloc=0",
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]


def check_prerequisites() -> Kernel:
    """The newest kernel to boot; Missing names every package that is not there, at
    once."""
    missing = []
    kernel = None
    try:
        kernel = find_kernel()
    except Missing:
        missing += ["linux-image-amd64", "linux-headers-amd64"]
    if not BUSYBOX.is_file():
        missing.append("busybox-static")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86")
    if missing:
        raise Missing(
            "the kernel module's test boots Debian's kernel in qemu and needs: "
            f"apt-get install {' '.join(missing)}"
        )
    assert kernel is not None
    return kernel


def run_guest(work: Path, kernel: Kernel | None = None, only: list[str] | None = None) -> str:
    """Build everything, boot kernel (default: the newest), and return the guest's
    console output (also kept in work/console.log, written as the guest runs). only: the
    names of the checks to run (by hand; default: all)."""
    newest = check_prerequisites()
    kernel = kernel or newest
    module = build_module(kernel, work)
    test_bin = build_test_program(work)
    initramfs = build_initramfs(kernel, module, test_bin, work, only)
    console = work / "console.log"
    note = ""
    for attempt in (1, 2):
        with open(console, "wb") as out:
            try:
                subprocess.run(
                    qemu_command(kernel, initramfs),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=VM_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                out.write(f"\nKMOD-VM: no power-off within {VM_TIMEOUT_S} s\n".encode())
        text = console.read_bytes().decode(errors="replace")
        if attempt == 2 or "KMOD-VM: init started" in text:
            break
        # The kernel died before its init ran: before our module or any check, so not
        # theirs to answer for. Kept, and booted once more.
        kept = console.with_name("console-1.log")
        console.replace(kept)
        note = f"KMOD-VM: the first boot died before init started (its console: {kept})\n"
    return note + text


RESULT = re.compile(r"^KMOD-TEST (PASS|FAIL) ([^\s:]+):?(.*)$", re.M)


def results(console: str) -> dict[str, tuple[bool, str]]:
    return {m[2]: (m[1] == "PASS", m[3].strip()) for m in RESULT.finditer(console)}


if __name__ == "__main__":
    # python -m tests.kmod_vm [CHECK...]: the newest kernel, those checks (default: all)
    with tempfile.TemporaryDirectory(prefix="netmem-vm-") as tmp:
        print(run_guest(Path(tmp), only=sys.argv[1:]))
