//! Ctrl-C and SIGTERM, the two ways a server is asked to stop.

use std::future::Future;

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM received after this call. The
/// listeners are installed here, not at the first poll, so a signal that arrives before
/// the future is awaited is not lost; keep one future for the whole life of the server.
/// Must be called inside a tokio runtime.
pub fn shutdown() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(interrupt) => {}
                _ = wait(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
