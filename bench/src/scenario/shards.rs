//! Per-thread connection shards: the generator's connections spread over several
//! single-threaded tokio runtimes, one per thread (pinned to one CPU each when the
//! process may use that many), instead of one work-stealing runtime.
//!
//! Why: at millions of deliveries per second a shared runtime and shared counters make
//! the generator, not the server, the limit (issue 24: an 8-core generator saturated at
//! ~2.3M deliveries/s). A connection's task stays on its shard's thread, its socket on
//! that thread's epoll, and what it counts goes to its shard's own cache line
//! ([`crate::stats::ShardedCounter`], [`crate::stats::Latency`]'s shard): no task
//! migrates, no counter line bounces between cores.
//!
//! The scenario's coordinator (sampling, draining, verification) runs on the caller's
//! runtime; member tasks are spawned onto a shard with [`Shards::spawn`] and their
//! `JoinHandle`s awaited from there.

use std::{future::Future, thread};

use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};

use crate::probe;

/// Running shard threads; stopped (their remaining tasks dropped) on drop.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Shards {
    /// Starts `n` shard threads (at least one). When `cpus` (the CPUs this process may
    /// use) has at least `n` entries, shard `i` is pinned to `cpus[i]`.
    pub fn start(n: usize, cpus: &[usize]) -> std::io::Result<Shards> {
        let n = n.max(1);
        let pin = cpus.len() >= n;
        let mut shards = Shards {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let cpu = if pin { cpus.get(i).copied() } else { None };
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        // Best effort: an unpinned shard still works.
                        let _ = probe::pin_thread(cpu);
                    }
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                    // Tasks still running (connections closing) are dropped.
                    rt.shutdown_background();
                })?;
            let handle = handle_rx
                .recv()
                .map_err(|_| std::io::Error::other("shard thread died before starting"))??;
            shards.handles.push(handle);
            shards.stops.push(stop_tx);
            shards.threads.push(thread);
        }
        Ok(shards)
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Spawns `fut` on shard `i % len`.
    pub fn spawn<F>(&self, i: usize, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[i % self.handles.len()].spawn(fut)
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks spawned with consecutive indexes run on distinct shard threads, and their
    /// results come back to a caller on another runtime.
    #[test]
    fn tasks_spread_over_shard_threads() {
        let shards = Shards::start(3, &[]).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let names = rt.block_on(async {
            let tasks: Vec<_> = (0..6)
                .map(|i| {
                    shards.spawn(i, async {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        thread::current().name().unwrap_or_default().to_string()
                    })
                })
                .collect();
            let mut names = Vec::new();
            for t in tasks {
                names.push(t.await.unwrap());
            }
            names
        });
        assert_eq!(
            names,
            [
                "shard-0", "shard-1", "shard-2", "shard-0", "shard-1", "shard-2"
            ]
        );
        drop(shards);
    }
}
