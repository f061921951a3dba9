//! FIFREEZE / FITHAW and the watchdog's own session: the agent's only
//! unsafe code (two ioctls and a `setsid` before exec), confined here. Everything else of the agent is `unsafe`-free (`deny(unsafe_code)`
//! at the crate root, allowed for this module only; `layering.rs` checks
//! that no other file says `unsafe`).
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::os::fd::AsRawFd;

pub(crate) use nix::errno::Errno;

// linux/fs.h: #define FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int)
nix::ioctl_readwrite!(ioctl_fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(ioctl_fithaw, b'X', 120, libc::c_int);

/// FIFREEZE on the file system of `file` (an open mount point directory).
/// EBUSY: already frozen.
pub(crate) fn freeze(file: &File) -> Result<(), Errno> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE takes an int argument it does not use; `file` is an
    // open directory fd we own (borrowed for the call), `arg` lives across it.
    unsafe { ioctl_fifreeze(file.as_raw_fd(), &mut arg) }.map(|_| ())
}

/// FITHAW on the file system of `file`. EINVAL: it was not frozen.
pub(crate) fn thaw(file: &File) -> Result<(), Errno> {
    let mut arg: libc::c_int = 0;
    // SAFETY: as in `freeze`: an int argument, an fd we own for the call.
    unsafe { ioctl_fithaw(file.as_raw_fd(), &mut arg) }.map(|_| ())
}

/// Makes the child `cmd` spawns the leader of a new session (and process
/// group): signals to the agent's group, or a hangup of its terminal, do
/// not reach it (the freeze watchdog).
pub(crate) fn in_own_session(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the forked child before exec; it calls
    // only setsid, which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
}
