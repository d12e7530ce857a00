//! Process resource limits.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises the soft limit on open files to the hard limit, best effort. Every visitor holds a
/// descriptor in the proxy and in the client, and the soft limit shells commonly start with
/// (1024) would cap either at about a thousand visitors at once while the hard limit allows far
/// more.
pub fn raise_open_file_limit() {
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        if soft < hard {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            if let Err(err) = setrlimit(Resource::Nofile, raised) {
                tracing::debug!(%err, soft, hard, "could not raise the open file limit");
            }
        }
    }
    let limit = getrlimit(Resource::Nofile);
    tracing::debug!(soft = ?limit.current, hard = ?limit.maximum, "open file limit");
}
