//! What an upstream listener serves right now. A reload swaps it: connections accepted
//! afterwards get the new upstream settings, and connections of the old ones drain: they
//! finish the request in flight, answer what the app sends within [`crate::shutdown::RETIRE_GRACE`]
//! (telling it the connection closes), and close.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// One generation of a listener's settings; `U` serves its connections (the proxy's
/// upstream).
pub struct Current<U> {
    pub upstream: Arc<U>,
    /// The connection cap, shared by every worker accepting on the socket.
    pub permits: Arc<Semaphore>,
    /// Cancelled when this generation is replaced or the listener stops: its
    /// connections drain and close (see the module comment).
    pub retire: CancellationToken,
}

/// The swappable settings of one listening socket.
pub struct Slot<U> {
    current: ArcSwap<Current<U>>,
}

impl<U> Slot<U> {
    pub fn new(serving: Current<U>) -> Slot<U> {
        Slot {
            current: ArcSwap::from_pointee(serving),
        }
    }

    /// The generation new connections get.
    pub fn current(&self) -> Arc<Current<U>> {
        self.current.load_full()
    }

    /// Installs `next` for new connections and retires the generation it replaces.
    pub fn replace(&self, next: Current<U>) {
        let old = self.current.swap(Arc::new(next));
        old.retire.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(name: &'static str, max: usize) -> Current<&'static str> {
        Current {
            upstream: Arc::new(name),
            permits: Arc::new(Semaphore::new(max)),
            retire: CancellationToken::new(),
        }
    }

    /// New connections get the replacement; the replaced generation is told to retire
    /// (its connections drain), and the replacement is not.
    #[test]
    fn a_replacement_serves_new_connections_and_retires_the_old() {
        let slot = Slot::new(generation("first", 4));
        let first = slot.current();
        assert_eq!(*first.upstream, "first");
        slot.replace(generation("second", 2));
        assert!(first.retire.is_cancelled());
        let second = slot.current();
        assert_eq!(*second.upstream, "second");
        assert_eq!(second.permits.available_permits(), 2);
        assert!(!second.retire.is_cancelled());
    }
}
