//! Service-manager notifications (systemd's `sd_notify`, through `$NOTIFY_SOCKET`; nothing when
//! it is not set): `READY=1` once the agent accepts, and after a hot restart `MAINPID=` so the
//! service manager follows the new agent instead of the old one that is about to exit. Used with
//! `Type=notify` and `NotifyAccess=all` (deploy/systemd/zone-ingress.service).

use sd_notify::NotifyState;

/// The agent accepts connections (a first start).
pub fn ready() {
    send(&[NotifyState::Ready], "READY");
}

/// This agent (a hot restart's new one) is about to tell the old one to exit: it becomes the
/// service's main process.
pub fn took_over() {
    send(
        &[NotifyState::MainPid(std::process::id()), NotifyState::Ready],
        "MAINPID",
    );
}

fn send(state: &[NotifyState], what: &str) {
    if let Err(e) = sd_notify::notify(state) {
        // The agent works without it; a unit with Type=notify would then time out starting.
        tracing::warn!(error = %e, notification = what, "could not notify the service manager ($NOTIFY_SOCKET)");
    }
}
