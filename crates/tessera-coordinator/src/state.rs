//! Whether the cluster can serve, shared by the scheduler, the health service and the API.

use tokio::sync::watch;

/// The cluster's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterState {
    /// Bring-up in progress; the text says how far it got.
    Starting(String),
    /// Every worker is ready.
    Serving,
    /// A worker was lost (the text names it and how far the rebuild got): the running
    /// sequences wait, and new requests queue, until a replacement has its shard.
    Recovering(String),
    /// Bring-up failed, or no replacement came within the recovery timeout (the cluster
    /// still takes one that comes later); the text says why. New requests are refused.
    Failed(String),
    /// The coordinator is stopping.
    Stopping,
}

impl ClusterState {
    /// The error a request gets when the cluster is not serving.
    pub fn refusal(&self) -> Option<crate::CoordinatorError> {
        use crate::CoordinatorError::{Cancelled, Unavailable};
        match self {
            ClusterState::Serving | ClusterState::Recovering(_) => None,
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

/// Starts a recovery for `message` unless one is under way, the cluster has already
/// failed, or it is stopping.
pub fn recover(state: &StateTx, message: String) {
    state.send_if_modified(|s| {
        if matches!(s, ClusterState::Serving) {
            tracing::warn!("{message}; recovering");
            *s = ClusterState::Recovering(message);
            true
        } else {
            false
        }
    });
}

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
