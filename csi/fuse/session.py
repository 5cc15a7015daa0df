"""The FUSE session: the /dev/fuse descriptor of one mount, apart from whoever serves it.

Mounting gets the descriptor one of two ways, as libfuse does:
- root: open /dev/fuse and mount(2) with `fd=N` in the options (no helper needed);
- anyone else: `fusermount3` (setuid) opens it and mounts, and sends it back over the
  socket named by `_FUSE_COMMFD` (SCM_RIGHTS).
A descriptor can be cloned (FUSE_DEV_IOC_CLONE): the clone reads requests of the same
session, so several processes can serve one mount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import stat
import struct
import subprocess
from dataclasses import dataclass

from csi.mounts import find_mount

DEVICE = "/dev/fuse"
FUSERMOUNT = "fusermount3"
FSTYPE = "fuse.cachefs"  # "fuse." + our subtype; csi/mounts.py finds mounts by it
FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2


class SessionError(OSError):
    """The session could not be opened, mounted or cloned; the message says why."""


@dataclass(frozen=True)
class MountOptions:
    fsname: str
    allow_other: bool = False  # pods run as other users than the root plugin

    def kernel(self, fd: int) -> str:
        """The options string of mount(2) (what fusermount3 would pass the kernel)."""
        opts = [f"fd={fd}", f"rootmode={stat.S_IFDIR:o}", f"user_id={os.geteuid()}",
                f"group_id={os.getegid()}", "default_permissions"]
        if self.allow_other:
            opts.append("allow_other")
        return ",".join(opts)

    def fusermount(self) -> str:
        """The options of `fusermount3 -o` (it adds fd, rootmode, user_id, group_id)."""
        opts = ["ro", "nosuid", "nodev", "default_permissions", "subtype=cachefs",
                f"fsname={_escape(self.fsname)}"]
        if self.allow_other:
            opts.append("allow_other")
        return ",".join(opts)


def _escape(value: str) -> str:
    """fusermount3 splits options on commas; a backslash escapes one."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def open_device() -> int:
    try:
        return os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise SessionError(e.errno, f"cannot open {DEVICE}: {e.strerror} (is the fuse module loaded, "
                                    "and /dev/fuse given to this container?)") from None


def mount(target: str, options: MountOptions, how: str = "auto") -> int:
    """Mount a session on `target`; its descriptor (close it to end the session).
    `how`: "mount" (mount(2), root), "fusermount3" (anyone), "auto" (by our uid)."""
    if how == "mount" or (how == "auto" and os.geteuid() == 0):
        return mount_syscall(target, options)
    return mount_fusermount(target, options)


def mount_syscall(target: str, options: MountOptions) -> int:
    """mount(2) with a fresh /dev/fuse descriptor (needs CAP_SYS_ADMIN)."""
    fd = open_device()
    libc = _libc()
    rc = libc.mount(os.fsencode(options.fsname or "cachefs"), os.fsencode(target), FSTYPE.encode(),
                    ctypes.c_ulong(MS_RDONLY | MS_NOSUID | MS_NODEV), options.kernel(fd).encode())
    if rc != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise SessionError(code, f"mount of {target} failed: {os.strerror(code)} "
                                 "(is it an existing directory, and do we hold CAP_SYS_ADMIN?)")
    return fd


def mount_fusermount(target: str, options: MountOptions, timeout: float = 30.0) -> int:
    """Ask fusermount3 to mount; it hands the descriptor back over a socket (_FUSE_COMMFD)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        argv = [FUSERMOUNT, "-o", options.fusermount(), "--", target]
        try:
            done = subprocess.run(argv, env=env, pass_fds=(theirs.fileno(),), capture_output=True,
                                  text=True, timeout=timeout)
        except FileNotFoundError:
            raise SessionError(errno.ENOENT, f"{FUSERMOUNT} is not installed (apt-get install fuse3)") from None
        except subprocess.TimeoutExpired:
            raise SessionError(errno.ETIMEDOUT, f"{FUSERMOUNT} did not finish within {timeout:.0f} s") from None
        theirs.close()
        if done.returncode != 0:
            raise SessionError(errno.EIO, f"{FUSERMOUNT} could not mount {target}: "
                                          f"{done.stderr.strip() or done.returncode}")
        ours.settimeout(timeout)
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise SessionError(errno.EIO, f"{FUSERMOUNT} mounted {target} but sent no descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def clone(fd: int) -> int:
    """A new descriptor reading requests of the same session (FUSE_DEV_IOC_CLONE)."""
    new = open_device()
    try:
        fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, struct.pack("I", fd))
    except OSError as e:
        os.close(new)
        raise SessionError(e.errno, f"cloning FUSE session {fd} failed: {e.strerror}") from None
    return new


def unmount(target: str) -> None:
    """Detach the mount (lazily: open files keep it until closed); not mounted is no error."""
    if os.geteuid() == 0:
        libc = _libc()
        if libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EINVAL:  # not a mount point (any more)
            return
        raise SessionError(code, f"umount of {target} failed: {os.strerror(code)}")
    done = subprocess.run([FUSERMOUNT, "-u", "-z", "--", target], capture_output=True, text=True, timeout=30)
    if done.returncode != 0 and find_mount(target) is not None:
        raise SessionError(errno.EIO, f"{FUSERMOUNT} -u {target} failed: {done.stderr.strip()}")
