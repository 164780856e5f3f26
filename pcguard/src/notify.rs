//! The service manager's notification protocol (`sd_notify(3)`), for a
//! `Type=notify` unit: `READY=1` once the programs are attached and the
//! first policy applied, `RELOADING=1` + `MONOTONIC_USEC` then `READY=1`
//! around every reload, `STOPPING=1` on SIGTERM, `STATUS=` lines naming the
//! policy generation and the last reload's outcome, and watchdog pings.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) every call is a
//! no-op. A failed send is logged at debug level and otherwise ignored: the
//! daemon's work does not depend on the service manager hearing it.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::debug!("sd_notify {states:?}: {e}");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1`, `MONOTONIC_USEC=<now>` (systemd 253 and later require it
/// with `RELOADING=1`) and a status line. [`ready`] ends the reload.
pub fn reloading(status: &str) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
        Err(e) => {
            log::debug!("CLOCK_MONOTONIC: {e}");
            send(&[NotifyState::Reloading, NotifyState::Status(status)]);
        }
    }
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// A `STATUS=` line alone.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `WATCHDOG=1`.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC` when the
/// service manager set it for this process (`WatchdogSec=` in the unit),
/// else `None`.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec / 2))
}
