//! The storage conformance suite over compio, on io_uring and on the polling
//! fallback with the portable driver; and the fallback when a seccomp filter
//! blocks io_uring, as Docker's default profile does.

use std::os::unix::process::CommandExt;

mod support;

use compio::driver::DriverType;
use rill_core::conformance;
use rill_node::io::{
    DriverSelection, IoDriver, IoDriverSetting, NodeStorage, UringStorage, build_runtime,
    io_uring_unavailable_reason, select_driver,
};
use support::rill_command;

fn runtime_for(driver: IoDriver) -> (compio::runtime::Runtime, DriverSelection) {
    let mut selection = DriverSelection {
        driver,
        reason: "test".into(),
    };
    let runtime = build_runtime(&mut selection).expect("runtime");
    (runtime, selection)
}

fn run_suite<S: rill_core::storage::Storage + 'static>(
    runtime: &compio::runtime::Runtime,
    storage: S,
    label: &str,
) {
    for (name, check) in conformance::all::<S>() {
        let directory = tempfile::tempdir().expect("tempdir");
        eprintln!("{label}: {name}");
        runtime.block_on(check(
            storage.clone(),
            directory.path().join("topic-0"),
            conformance::small_config(),
        ));
    }
}

#[test]
fn io_uring_driver_passes_the_suite() {
    match io_uring_unavailable_reason() {
        None => {
            let (runtime, selection) = runtime_for(IoDriver::IoUring);
            assert_eq!(selection.driver, IoDriver::IoUring, "{}", selection.reason);
            assert_eq!(runtime.driver_type(), DriverType::IoUring);
            run_suite(&runtime, UringStorage, "io-uring");
            run_suite(
                &runtime,
                NodeStorage::for_driver(IoDriver::IoUring),
                "io-uring (node storage)",
            );
        }
        Some(reason) => {
            // Under qemu-user or seccomp: the same request must fall back, not fail.
            assert!(
                std::env::var_os("RILL_REQUIRE_IO_URING").is_none(),
                "io_uring was required by RILL_REQUIRE_IO_URING but is unavailable: {reason}"
            );
            let selection = select_driver(IoDriverSetting::Auto).expect("auto never fails");
            assert_eq!(selection.driver, IoDriver::Portable);
            assert!(
                selection.reason.contains("io_uring unavailable"),
                "{}",
                selection.reason
            );
            let forced = select_driver(IoDriverSetting::IoUring)
                .expect_err("forced io-uring must say why not");
            assert!(forced.contains("unavailable"), "{forced}");
            eprintln!("io_uring unavailable here ({reason}); checked the fallback instead");
        }
    }
}

#[test]
fn portable_driver_on_the_polling_runtime_passes_the_suite() {
    let selection = select_driver(IoDriverSetting::Portable).expect("portable is always available");
    assert_eq!(selection.driver, IoDriver::Portable);
    let (runtime, _) = runtime_for(IoDriver::Portable);
    assert_eq!(runtime.driver_type(), DriverType::Poll);
    run_suite(
        &runtime,
        NodeStorage::for_driver(IoDriver::Portable),
        "portable",
    );
}

/// Installs a seccomp filter that fails io_uring_setup with EPERM, as Docker's
/// default profile does, and allows everything else.
fn block_io_uring_setup() -> std::io::Result<()> {
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let syscall_number = libc::SYS_io_uring_setup as u32;
    let filter = [
        // Load the syscall number (offset 0 of seccomp_data).
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: syscall_number,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls in the forked child before exec; the program
    // outlives the call, which copies it into the kernel.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn blocked_io_uring_falls_back_to_portable_with_a_reason() {
    // Where io_uring is missing already (qemu-user), the plain start must fall
    // back; elsewhere a seccomp filter blocks it the way Docker's profile does.
    let blocked_here = io_uring_unavailable_reason().is_some();
    let probe = |arguments: &[&str]| {
        let mut command = rill_command();
        command.args(arguments).env_remove("RILL_IO_DRIVER");
        if !blocked_here {
            // SAFETY: the closure only makes async-signal-safe prctl calls.
            unsafe { command.pre_exec(block_io_uring_setup) };
        }
        command.output().expect("run rill io probe")
    };
    let output = probe(&["io", "probe"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "rill refused to start without io_uring: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("driver: portable"), "{stdout}");
    let expected_reason = if blocked_here {
        "io_uring unavailable"
    } else {
        "EPERM"
    };
    assert!(
        stdout.contains(expected_reason),
        "the reason must name the refusal: {stdout}"
    );
    assert!(stdout.contains("runtime: Poll"), "{stdout}");

    let output = probe(&["io", "probe", "--io-driver", "io-uring"]);
    assert!(
        !output.status.success(),
        "forcing io-uring where it is blocked must fail clearly"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("io_uring is unavailable") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
