//! The few socket options the datapaths read and set, without repeating the unsafe calls.

use std::io;
use std::os::fd::AsRawFd;

/// Option values the kernel fills byte for byte: plain integers and C structs for which all-zero
/// bytes are a valid value.
pub(crate) trait PlainValue: Copy {}
impl PlainValue for u64 {}
impl PlainValue for libc::c_int {}
impl PlainValue for libc::tcp_info {}

/// `getsockopt` into a zeroed `T` (the kernel may fill less than all of it, e.g. an older
/// kernel's shorter `tcp_info`).
pub(crate) fn get<T: PlainValue>(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    // SAFETY: PlainValue types are valid when all-zero.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

pub(crate) fn set_int(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the kernel reads one int from `value`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
