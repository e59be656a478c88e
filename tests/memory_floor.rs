//! The floor under a live conversation's memory (issue 16): what an idle ractor actor costs
//! alone, before any state of ours, beside a plain tokio task waiting on a channel. Measured as
//! resident memory growth over many of them in this test's own process (the system allocator;
//! the router's jemalloc rounds differently), printed with `--nocapture`.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

const ACTORS: usize = 20_000;

struct Idle;

impl Actor for Idle {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        _args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(())
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_actor_alone_sets_the_floor_of_a_live_conversation() {
    // Warm the runtime and the allocator so the first measurement is not the process's own.
    let warm: Vec<_> = (0..1_000)
        .map(|_| tokio::spawn(std::future::pending::<()>()))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for task in &warm {
        task.abort();
    }

    let before = rss_kib();
    let mut tasks = Vec::with_capacity(ACTORS);
    for _ in 0..ACTORS {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        tasks.push((
            tx,
            tokio::spawn(async move { while rx.recv().await.is_some() {} }),
        ));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let task_kib = (rss_kib().saturating_sub(before)) as f64 / ACTORS as f64;
    drop(tasks);

    let before = rss_kib();
    let mut actors = Vec::with_capacity(ACTORS);
    for _ in 0..ACTORS {
        let (actor, handle) = Actor::spawn(None, Idle, ()).await.expect("an actor starts");
        actors.push((actor, handle));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let actor_kib = (rss_kib().saturating_sub(before)) as f64 / ACTORS as f64;
    eprintln!(
        "resident memory per idle ractor actor: {actor_kib:.2} KiB; per tokio task on a channel: {task_kib:.2} KiB ({ACTORS} each)"
    );
    for (actor, handle) in actors {
        actor.stop(None);
        let _ = handle.await;
    }
    // The floor of a live conversation, kept from growing unnoticed (measured 5.5 KiB, against
    // a budget of 6 KiB for a whole live conversation).
    assert!(
        actor_kib > 0.0 && actor_kib < 12.0,
        "{actor_kib:.2} KiB per idle actor"
    );
}
