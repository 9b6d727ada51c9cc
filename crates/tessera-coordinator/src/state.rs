//! Whether the cluster can serve, shared by the scheduler, the health service and the API.

use tokio::sync::watch;

/// The cluster's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterState {
    /// Bring-up in progress; the text says how far it got.
    Starting(String),
    /// Every worker is ready.
    Serving,
    /// A worker failed; the text names it. New requests are refused.
    Failed(String),
    /// The coordinator is stopping.
    Stopping,
}

impl ClusterState {
    /// The error a request gets when the cluster is not serving.
    pub fn refusal(&self) -> Option<crate::CoordinatorError> {
        use crate::CoordinatorError::{Cancelled, Unavailable};
        match self {
            ClusterState::Serving => None,
            ClusterState::Starting(s) => Some(Unavailable(format!("the cluster is starting: {s}"))),
            ClusterState::Failed(s) => Some(Unavailable(format!("the cluster has failed: {s}"))),
            ClusterState::Stopping => Some(Cancelled("the server is shutting down".into())),
        }
    }
}

/// The shared state cell.
pub type StateTx = watch::Sender<ClusterState>;
/// A view of the shared state cell.
pub type StateRx = watch::Receiver<ClusterState>;

/// Marks the cluster failed unless it already is (the first failure is the one reported).
pub fn fail(state: &StateTx, message: String) {
    state.send_if_modified(|s| {
        if matches!(s, ClusterState::Failed(_) | ClusterState::Stopping) {
            false
        } else {
            tracing::error!("{message}");
            *s = ClusterState::Failed(message);
            true
        }
    });
}
