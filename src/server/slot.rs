//! What an upstream listener serves right now. A reload swaps it: connections accepted
//! afterwards get the new upstream settings, and connections of the old ones drain: they
//! finish the request in flight, answer what the app sends within [`RETIRE_GRACE`]
//! (telling it the connection closes), and close.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::proxy::Upstream;

/// How long a retired connection that is idle waits for the app's next request. An app
/// reusing a keep-alive connection may be sending one as the reload lands; it is
/// answered (with `Connection: close`) rather than cut off.
pub const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// One generation of a listener's settings.
pub struct Current {
    pub upstream: Arc<Upstream>,
    /// The connection cap, shared by every worker accepting on the socket.
    pub permits: Arc<Semaphore>,
    /// Cancelled when this generation is replaced or the listener stops: its
    /// connections drain and close (see the module comment).
    pub retire: CancellationToken,
}

/// The swappable settings of one listening socket.
pub struct Slot {
    current: ArcSwap<Current>,
}

impl Slot {
    pub fn new(serving: Current) -> Slot {
        Slot {
            current: ArcSwap::from_pointee(serving),
        }
    }

    /// The generation new connections get.
    pub fn current(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Installs `next` for new connections and retires the generation it replaces.
    pub fn replace(&self, next: Current) {
        let old = self.current.swap(Arc::new(next));
        old.retire.cancel();
    }
}
