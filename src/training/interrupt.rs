//! Ctrl-C and SIGTERM during training: the first one asks the training loop to stop at the end
//! of the current step, write a checkpoint there and exit with [`exit_code`] (130 for SIGINT,
//! 143 for SIGTERM, the shell's convention); `--resume` then continues from that step and
//! reaches the same numbers as an uninterrupted run. A second signal ends the process at once.
//!
//! The binary enables it ([`enable`]); the training loop installs the handler while it runs.

use std::sync::atomic::{AtomicI32, Ordering};

static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// The signal number that asked training to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Asks training to stop as signal `signal` would (tests, and the handler).
pub fn request(signal: i32) {
    REQUESTED.store(signal, Ordering::SeqCst);
}

/// The exit code of a run stopped by `signal`: 128 + its number.
pub fn exit_code(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}

/// The name of a signal for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT (Ctrl-C)",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// SIGINT's number.
pub const SIGINT: i32 = 2;
/// SIGTERM's number.
pub const SIGTERM: i32 = 15;

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes training catch SIGINT and SIGTERM while its loop runs ([`arm`] / [`disarm`]); outside
/// the loop (reading data, filling the teacher cache, which writes atomically) the signals
/// keep their default and end the process at once. The binary calls this for `train`.
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Installs the handler, if [`enable`]d: the training loop starts.
pub fn arm() {
    if ENABLED.load(Ordering::SeqCst) {
        install();
    }
}

/// Restores the default disposition, if [`enable`]d: the training loop ended.
pub fn disarm() {
    #[cfg(unix)]
    if ENABLED.load(Ordering::SeqCst) {
        // SAFETY: restoring the default disposition.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
        }
    }
}

/// Installs the handler of SIGINT and SIGTERM (Unix; elsewhere the default stays).
fn install() {
    #[cfg(unix)]
    {
        extern "C" fn handler(signal: libc::c_int) {
            // Only async-signal-safe calls here: an atomic swap, and _exit on the second signal.
            if REQUESTED.swap(signal, Ordering::SeqCst) != 0 {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(exit_code(signal) as libc::c_int) };
            }
        }
        debug_assert_eq!((SIGINT, SIGTERM), (libc::SIGINT, libc::SIGTERM));
        let handler = handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe {
            libc::signal(libc::SIGINT, handler);
            libc::signal(libc::SIGTERM, handler);
        }
    }
}

/// Sends `signal` to this process (the test hook `MTAD_SIGNAL_AT`).
pub fn raise(signal: i32) {
    #[cfg(unix)]
    // SAFETY: raise with a valid signal number.
    unsafe {
        libc::raise(signal);
    }
    #[cfg(not(unix))]
    request(signal);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shells_convention() {
        assert_eq!(exit_code(SIGINT), 130);
        assert_eq!(exit_code(SIGTERM), 143);
        assert_eq!(signal_name(SIGTERM), "SIGTERM");
    }
}
