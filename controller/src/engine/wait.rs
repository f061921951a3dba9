//! [`poll_until`]: the one bounded wait of the steps (an EC2 state, an
//! agent, a DNS change, a health check): look, and until what is looked
//! for is there, say what is waited for and look again after an interval,
//! up to a deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How a [`poll_until`] waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollOpts {
    /// Given up (with [`Waited::TimedOut`]) on the first look that finds
    /// it still waiting after this long.
    pub timeout: Duration,
    /// The first pause between two looks.
    pub interval: Duration,
    /// Each pause doubles up to this (equal to `interval`: a fixed pace).
    pub max_interval: Duration,
}

impl PollOpts {
    /// Looks every `interval`, for at most `timeout`.
    pub const fn every(interval: Duration, timeout: Duration) -> Self {
        PollOpts { timeout, interval, max_interval: interval }
    }

    /// Pauses that double from `interval` up to `max_interval`.
    pub const fn backoff(mut self, max_interval: Duration) -> Self {
        self.max_interval = max_interval;
        self
    }
}

/// What one look found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Poll<T, W> {
    /// There: the wait ends with it.
    Ready(T),
    /// Not yet: `state` (handed back if the wait ends without it) and
    /// `progress`, what is waited for, in a human's words.
    Waiting { state: W, progress: String },
}

/// Why a [`poll_until`] ended without what it waited for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waited<W, E> {
    /// Still waiting after the timeout; the last look's state.
    TimedOut { last: W, waited: Duration },
    /// Cancellation was asked for (an abort); the last look's state.
    Cancelled { last: W, waited: Duration },
    /// A look failed: the wait ends at once with its error.
    Failed(E),
}

/// Progress of a long wait, throttled: reported when what is waited for
/// changes, and otherwise every few seconds (not at every look: `drctl
/// --wait` prints each change), with the time waited so far.
pub struct Progress {
    started: Instant,
    last: String,
    at: Option<Instant>,
}

/// A report repeated unchanged at most this often.
const REPEAT_EVERY: Duration = Duration::from_secs(5);

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Progress { started: Instant::now(), last: String::new(), at: None }
    }

    /// Time since the wait began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `what` with the time so far, when it is due (changed, or unchanged
    /// for [`REPEAT_EVERY`]); `None` when it is not.
    pub fn due(&mut self, what: String) -> Option<String> {
        let due = self.at.is_none_or(|t| t.elapsed() >= REPEAT_EVERY);
        if what != self.last || due {
            let line = format!("{what} ({} so far)", secs(self.started.elapsed().as_millis() as u64));
            self.last = what;
            self.at = Some(Instant::now());
            Some(line)
        } else {
            None
        }
    }
}

/// Milliseconds as seconds with a tenth (`1.5 s`).
pub fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Looks with `check` until it finds what it waits for, pausing as `opts`
/// say between looks. After each look that finds it still waiting:
/// `cancelled()` ends the wait ([`Waited::Cancelled`]), then the timeout
/// ([`Waited::TimedOut`]), else `report` is given the progress line when
/// due (see [`Progress`]). A look that fails ends the wait with its error.
pub async fn poll_until<T, W, E, C, CF, R, RF>(
    opts: PollOpts,
    mut check: C,
    cancelled: impl Fn() -> bool,
    mut report: R,
) -> Result<T, Waited<W, E>>
where
    C: FnMut() -> CF,
    CF: Future<Output = Result<Poll<T, W>, E>>,
    R: FnMut(String) -> RF,
    RF: Future<Output = ()>,
{
    let mut progress = Progress::new();
    let mut interval = opts.interval;
    loop {
        match check().await.map_err(Waited::Failed)? {
            Poll::Ready(t) => return Ok(t),
            Poll::Waiting { state, progress: what } => {
                let waited = progress.elapsed();
                if cancelled() {
                    return Err(Waited::Cancelled { last: state, waited });
                }
                if waited >= opts.timeout {
                    return Err(Waited::TimedOut { last: state, waited });
                }
                if let Some(line) = progress.due(what) {
                    report(line).await;
                }
            }
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(opts.max_interval.max(opts.interval));
    }
}

impl<D: Send + Sync + 'static> super::Ctx<D> {
    /// [`poll_until`] in a step: progress goes to the step's detail
    /// ([`super::Ctx::progress`]); with `cancellable`, an abort of the
    /// operation ends the wait ([`Waited::Cancelled`]).
    pub async fn poll_until<T, W, E, C, CF>(&self, opts: PollOpts, cancellable: bool, check: C) -> Result<T, Waited<W, E>>
    where
        C: FnMut() -> CF,
        CF: Future<Output = Result<Poll<T, W>, E>>,
    {
        poll_until(opts, check, || cancellable && self.abort_requested(), |line| self.progress(line)).await
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    fn never() -> bool {
        false
    }

    #[tokio::test(start_paused = true)]
    async fn ends_with_what_it_waited_for() {
        let looks = Cell::new(0u32);
        let lines = RefCell::new(vec![]);
        let started = Instant::now();
        let got: Result<&str, Waited<u32, ()>> = poll_until(
            PollOpts::every(Duration::from_millis(500), Duration::from_secs(60)),
            || async {
                looks.set(looks.get() + 1);
                Ok(if looks.get() == 3 { Poll::Ready("running") } else { Poll::Waiting { state: looks.get(), progress: "pending".into() } })
            },
            never,
            |l| async { lines.borrow_mut().push(l) },
        )
        .await;
        assert_eq!(got, Ok("running"));
        assert_eq!(looks.get(), 3);
        assert_eq!(started.elapsed(), Duration::from_secs(1), "two pauses of 500 ms");
        assert_eq!(lines.into_inner(), ["pending (0.0 s so far)"], "an unchanged wait is said once within 5 s");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_with_the_last_state() {
        let looks = Cell::new(0u32);
        let got: Result<(), Waited<u32, ()>> = poll_until(
            PollOpts::every(Duration::from_secs(1), Duration::from_secs(10)),
            || async {
                looks.set(looks.get() + 1);
                Ok(Poll::Waiting { state: looks.get(), progress: "stopping".into() })
            },
            never,
            |_| async {},
        )
        .await;
        assert_eq!(got, Err(Waited::TimedOut { last: 11, waited: Duration::from_secs(10) }), "the look at 10 s is the last");
    }

    #[tokio::test(start_paused = true)]
    async fn says_each_change_and_repeats_every_five_seconds() {
        let looks = Cell::new(0u32);
        let lines = RefCell::new(vec![]);
        let _: Result<(), Waited<(), ()>> = poll_until(
            PollOpts::every(Duration::from_secs(1), Duration::from_secs(8)),
            || async {
                looks.set(looks.get() + 1);
                let what = if looks.get() <= 2 { "pending" } else { "running, no agent yet" };
                Ok(Poll::Waiting { state: (), progress: what.into() })
            },
            never,
            |l| async { lines.borrow_mut().push(l) },
        )
        .await;
        assert_eq!(
            lines.into_inner(),
            ["pending (0.0 s so far)", "running, no agent yet (2.0 s so far)", "running, no agent yet (7.0 s so far)"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_up_to_its_longest_pause() {
        let at = RefCell::new(vec![]);
        let started = Instant::now();
        let _: Result<(), Waited<(), ()>> = poll_until(
            PollOpts::every(Duration::from_millis(200), Duration::from_secs(10)).backoff(Duration::from_secs(1)),
            || async {
                at.borrow_mut().push(started.elapsed().as_millis());
                Ok(Poll::Waiting { state: (), progress: String::new() })
            },
            never,
            |_| async {},
        )
        .await;
        assert_eq!(at.into_inner()[..6], [0, 200, 600, 1400, 2400, 3400]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_look_or_a_cancellation_ends_it_at_once() {
        let failed: Result<(), Waited<(), &str>> =
            poll_until(PollOpts::every(Duration::from_secs(1), Duration::from_secs(10)), || async { Err("refused") }, never, |_| async {})
                .await;
        assert_eq!(failed, Err(Waited::Failed("refused")));
        let looks = Cell::new(0u32);
        let cancelled: Result<(), Waited<u32, ()>> = poll_until(
            PollOpts::every(Duration::from_secs(1), Duration::from_secs(10)),
            || async {
                looks.set(looks.get() + 1);
                Ok(Poll::Waiting { state: looks.get(), progress: String::new() })
            },
            || looks.get() == 2,
            |_| async {},
        )
        .await;
        assert_eq!(cancelled, Err(Waited::Cancelled { last: 2, waited: Duration::from_secs(1) }));
    }
}
