//! Waiting for something that happens in another task or process: one polling loop for every
//! test, with a deadline and a message that says what never happened.

use std::future::Future;
use std::time::Duration;

/// How often a condition is tried again.
const INTERVAL: Duration = Duration::from_millis(20);

/// Tries `probe` every 20 ms until it answers `Some`, and returns that answer; panics after
/// `within`, naming `what`.
///
/// # Panics
/// When `within` passes first.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(answer) = probe().await {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(INTERVAL).await;
    }
}

/// [`eventually`] for a condition that needs no waiting of its own.
///
/// # Panics
/// When `within` passes first.
pub async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    eventually(what, within, || std::future::ready(done().then_some(()))).await;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_the_first_answer() {
        let tries = Arc::new(AtomicUsize::new(0));
        let answer = eventually("the third try", Duration::from_secs(5), || {
            let tries = Arc::clone(&tries);
            async move {
                let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
                (n == 3).then_some(n)
            }
        })
        .await;
        assert_eq!(answer, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 100ms waiting for nothing")]
    async fn panics_at_the_deadline() {
        until("nothing", Duration::from_millis(100), || false).await;
    }
}
