//! The watch loop shared by the networked stores: subscribe to the backend's change
//! notifications, look at the stored generation after each one and at least every poll
//! interval, and resubscribe with backoff when the subscription or the store fails.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::StoreSignal;

/// A live subscription to a credential's change notifications.
#[async_trait]
pub trait Notifications: Send {
    /// Waits for the next notification; `false` once the subscription is lost.
    async fn next(&mut self) -> bool;
}

/// Spawns the loop; `subscribe` opens a subscription (`None` on failure), `look` reads
/// the stored generation (or the error that prevented it).
pub fn spawn<Sub, SubFut, Look, LookFut>(
    poll: Duration,
    subscribe: Sub,
    look: Look,
) -> watch::Receiver<StoreSignal>
where
    Sub: Fn() -> SubFut + Send + 'static,
    SubFut: Future<Output = Option<Box<dyn Notifications>>> + Send,
    Look: Fn() -> LookFut + Send + 'static,
    LookFut: Future<Output = StoreSignal> + Send,
{
    let (tx, rx) = watch::channel(StoreSignal::default());
    tokio::spawn(async move {
        let publish = |signal: StoreSignal| {
            let failed = signal.error.is_some();
            tx.send_if_modified(|s| {
                let changed = *s != signal;
                *s = signal;
                changed
            });
            failed
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            // Subscribe first, then look, so no change between the two is missed.
            let Some(mut notes) = subscribe().await else {
                let failed = publish(look().await);
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(if failed { backoff } else { poll }).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            };
            backoff = Duration::from_millis(200);
            publish(look().await);
            let mut tick = tokio::time::interval(poll);
            loop {
                tokio::select! {
                    alive = notes.next() => {
                        if !alive {
                            break; // resubscribe
                        }
                        publish(look().await);
                    }
                    _ = tick.tick() => {
                        if publish(look().await) {
                            break;
                        }
                    }
                    _ = tx.closed() => return,
                }
            }
        }
    });
    rx
}
