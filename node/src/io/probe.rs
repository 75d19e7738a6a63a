//! Asks the kernel whether io_uring can be set up, and why not when it cannot.
//!
//! compio's own probe turns every failure into "unsupported"; the broker must
//! say why it fell back (seccomp, an old kernel, an emulator), so it asks once
//! itself with a tiny ring and closes it again.

/// Why io_uring cannot be used, in words an operator can act on.
pub fn io_uring_unavailable_reason() -> Option<String> {
    // io_uring_params is 120 bytes; the kernel fills it in.
    let mut params = [0u64; 15];
    // SAFETY: io_uring_setup reads and writes only the params buffer we own,
    // which is as large as the kernel's struct; a returned descriptor is closed.
    let result = unsafe { libc::syscall(libc::SYS_io_uring_setup, 2u32, params.as_mut_ptr()) };
    if result >= 0 {
        // SAFETY: the descriptor was just returned to us and is not used again.
        unsafe { libc::close(result as i32) };
        return None;
    }
    let error = std::io::Error::last_os_error();
    let reason = match error.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "io_uring_setup was refused (EPERM): a seccomp profile blocks it (Docker's \
             default profile does since 25.0) or kernel.io_uring_disabled is set"
        }
        Some(libc::ENOSYS) => {
            "io_uring_setup does not exist here (ENOSYS): the kernel was built without \
             io_uring, or this runs under an emulator such as qemu-user"
        }
        Some(libc::ENOMEM) => {
            "io_uring_setup ran out of locked memory (ENOMEM): raise RLIMIT_MEMLOCK"
        }
        _ => "io_uring_setup failed",
    };
    Some(format!("{reason} [{error}]"))
}
