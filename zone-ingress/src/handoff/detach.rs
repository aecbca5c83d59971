//! `run --upgrade --detach`: a hot restart driven by a service manager's reload command.
//!
//! A reload command (systemd's `ExecReload=`) must return, but the new agent must keep running.
//! So the command starts the new agent as a detached process (its own session, stdin closed, the
//! same stdout/stderr, so its logs reach the same journal) and waits, at most [`WAIT`], for it to
//! say on a pipe whether the takeover finished. It then exits 0, or 1 with the reason, so
//! `systemctl reload` reports a failed upgrade. Either way the running agent keeps serving until
//! a takeover completes.
//!
//! The new agent reports to the service manager too ([`crate::service`]): `MAINPID=` before it
//! tells the old agent to exit, so systemd follows the new process as the unit's main process.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Environment variable naming the pipe a detached new agent reports its takeover on.
pub const REPORT_FD_ENV: &str = "ZONE_INGRESS_UPGRADE_REPORT_FD";

/// How long the launcher waits for the takeover (a control-plane agent bootstraps first).
pub const WAIT: Duration = Duration::from_secs(300);

/// What the new agent writes on the pipe once its takeover ended.
const OK: &str = "ok";

/// Runs the launcher: starts `<this binary> <args without --detach>` detached and waits for its
/// report. `args` are the command-line arguments after the program name.
pub fn launch(args: Vec<OsString>) -> ExitCode {
    match launch_inner(args) {
        Ok(pid) => {
            println!("zone-ingress: upgrade done: the new agent (pid {pid}) took over");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zone-ingress: upgrade failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn launch_inner(args: Vec<OsString>) -> Result<u32, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this program's path to start the new agent: {e}"))?;
    let (read, write) = pipe().map_err(|e| format!("cannot create the report pipe: {e}"))?;
    let write_fd = write.as_raw_fd();
    let mut cmd = Command::new(&exe);
    cmd.args(args.into_iter().filter(|a| a != "--detach"))
        .env(REPORT_FD_ENV, write_fd.to_string())
        .stdin(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: fcntl (keep the pipe's write end
    // across exec) and setsid (the new agent must outlive this command and its terminal).
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(write_fd, libc::F_SETFD, 0) != 0 || libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    drop(write);
    let deadline = Instant::now() + WAIT;
    let report = read_report(read, deadline)
        .map_err(|e| format!("reading the new agent's report (pid {pid}): {e}"))?;
    match report {
        Some(line) if line == OK => Ok(pid),
        Some(line) => Err(format!(
            "the new agent (pid {pid}) says: {line}; the running agent keeps serving"
        )),
        None => {
            // The pipe closed without a report: the new agent exited (or never reached the
            // takeover). Its status says which; its log says why. The kernel closes an exiting
            // process's descriptors before it can be reaped, so the status may lag the EOF by
            // a moment: wait for it, briefly.
            let status = match wait_exit(&mut child, EXIT_GRACE) {
                Some(s) => describe(s),
                None => "still running without reporting".to_string(),
            };
            Err(format!(
                "the new agent (pid {pid}) ended before taking over ({status}); the running \
                 agent keeps serving; the new agent's log (same journal) says why"
            ))
        }
    }
}

/// How long the launcher waits for the exit status of a new agent that closed its report pipe.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The child's exit status once it has one, polled until `grace` runs out.
fn wait_exit(child: &mut std::process::Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

fn describe(s: std::process::ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".to_string(),
    }
}

/// Reads the one-line report, or `None` when the pipe closed without one, within `deadline`.
fn read_report(read: OwnedFd, deadline: Instant) -> io::Result<Option<String>> {
    let mut file = std::fs::File::from(read);
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no report within {} s; the new agent may still finish",
                    WAIT.as_secs()
                ),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(1000) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut chunk = [0u8; 512];
        let got = file.read(&mut chunk)?;
        if got == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..got]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if buf.len() > 4096 {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The new agent's side: if a launcher waits ([`REPORT_FD_ENV`]), tells it how the takeover
/// ended (`Ok` or the error) and closes the pipe. Called once; later calls do nothing.
pub fn report(outcome: Result<(), &str>) {
    let Some(fd) = std::env::var(REPORT_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<libc::c_int>().ok())
    else {
        return;
    };
    // The descriptor is closed after the first report: never write to the number again.
    static REPORTED: AtomicBool = AtomicBool::new(false);
    if REPORTED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: the launcher passed this descriptor for this purpose; it is not used elsewhere.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let line = match outcome {
        Ok(()) => OK.to_string(),
        Err(e) => e.replace('\n', " "),
    };
    if let Err(e) = writeln!(file, "{line}") {
        tracing::warn!(error = %e, "could not report the takeover to the upgrade command");
    }
}
