//! `chat`: N users in rooms of K members, each user sending a message every T seconds —
//! the realistic mix of many small rooms. Same checks as `fanout`, per room.

use std::time::Duration;

use serde::Serialize;

use super::{
    Report, Run,
    fanout::{outcome_panels, outcome_rows},
    rooms::{self, MemberSpec, Outcome, Plan},
    run_id,
};
use crate::{
    report::{Panel, Table},
    ui::si,
};

#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub users: usize,
    /// Members per room (the last room may be smaller).
    pub room_size: usize,
    /// Each user sends one message every this long.
    pub every: Duration,
    pub duration: Duration,
    pub body_bytes: usize,
    pub drain_timeout: Duration,
    /// Acknowledge the session position every this many pushes (0 = never).
    pub ack_every: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            users: 1000,
            room_size: 10,
            every: Duration::from_secs(5),
            duration: Duration::from_secs(20),
            body_bytes: 100,
            drain_timeout: Duration::from_secs(15),
            ack_every: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatReport {
    pub scenario: &'static str,
    pub transport: &'static str,
    pub encoding: &'static str,
    pub params: Params,
    /// Deliveries per second offered: users / every × room size.
    pub offered_deliveries_per_s: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

pub async fn run(run: &Run, params: &Params) -> anyhow::Result<ChatReport> {
    anyhow::ensure!(params.users > 0, "need at least one user");
    anyhow::ensure!(params.room_size > 0, "rooms need at least one member");
    anyhow::ensure!(!params.every.is_zero(), "--every must be positive");
    let id = run_id();
    let rooms_n = params.users.div_ceil(params.room_size);
    let rate = 1.0 / params.every.as_secs_f64();
    let members = (0..params.users)
        .map(|i| MemberSpec {
            user: format!("chat-{id}-{i}"),
            room: i / params.room_size,
            rate,
            quota: None,
            counted: true,
        })
        .collect();
    let plan = Plan {
        rooms: (0..rooms_n).map(|r| format!("chat-{id}-r{r}")).collect(),
        members,
        duration: params.duration,
        body_bytes: params.body_bytes,
        drain_timeout: params.drain_timeout,
        ack_every: params.ack_every,
        label: "chat",
    };
    let outcome = rooms::run(run, plan).await?;
    Ok(ChatReport {
        scenario: "chat",
        transport: run.target.transport.name(),
        encoding: run.target.encoding.subprotocol(),
        params: params.clone(),
        offered_deliveries_per_s: params.users as f64 * rate * params.room_size as f64,
        outcome,
    })
}

impl Report for ChatReport {
    fn title(&self) -> String {
        format!(
            "chat: {} users in rooms of {}, one message each every {:?}, {} ({})",
            self.params.users,
            self.params.room_size,
            self.params.every,
            self.transport,
            self.encoding
        )
    }

    fn table(&self) -> Table {
        let mut t = Table::new(self.title());
        t.row("rooms", self.outcome.rooms.to_string());
        t.row("offered deliveries/s", si(self.offered_deliveries_per_s));
        outcome_rows(&mut t, &self.outcome);
        t
    }

    fn panels(&self) -> Vec<Panel> {
        outcome_panels(&self.outcome, Some(self.offered_deliveries_per_s))
    }

    fn ok(&self) -> bool {
        self.outcome.verification.ok()
    }

    fn headline(&self) -> Vec<(&'static str, f64)> {
        super::fanout::outcome_headline(&self.outcome)
    }
}
