//! Presence across instances, in Redis keys (all under the configured prefix):
//!
//! - `instances` — sorted set: instance id → expiry (Unix ms), refreshed every
//!   `presence_heartbeat`, valid for `presence_ttl`; an instance is alive while its expiry
//!   is in the future;
//! - `online:{user}` — set of the instances that have a session of the user; the user is
//!   online while any of them is alive;
//! - `users:{instance}` — set of the users an instance has sessions for (so that the
//!   instances still alive can tell co-members when it dies);
//! - `addr:{instance}` — its HTTP address for relayed session requests;
//! - `seen:{user}` — last-seen time (Unix ms), expiring after `last_seen_ttl`.
//!
//! In a Redis Cluster (`broker.cluster`) the prefix of these keys is a hash tag
//! (`{parley}:online:alice`): all of them live in one slot, so the pipelines below, which
//! mix keys, and `MGET` never span slots. Presence is then served by one node; it costs
//! O(1) commands per heartbeat and per user going online or offline, small next to the
//! fan-out, which the channels spread over every node.
//!
//! A heartbeat costs O(1) commands whatever the number of users: user entries are
//! written when a user's first local session starts and removed when the last ends, and
//! they are only believed while their instance is alive. An instance that dies (kill -9,
//! lost machine) stops refreshing: its users read as offline as soon as its expiry passes
//! (at most `presence_ttl` after its last heartbeat), and the first live instance whose
//! heartbeat notices the dead one claims it (`ZREM` returns 1 to one instance only),
//! removes it from its users' sets and reports those offline everywhere so chat can push
//! presence. After a Redis restart (which loses these keys) every instance writes its
//! users again ([`Presence::restore`]). Expiries are compared with each instance's clock:
//! keep clocks in sync (NTP); skew shifts the bound by the same amount.
//!
//! Owns: the presence keys. Not: presence pushes (`chat`).

use std::time::Duration;

use super::{UserPresence, conn::Conn};

/// Key names of one deployment.
#[derive(Clone)]
pub struct Keys {
    /// Of the channels.
    prefix: String,
    /// Of the presence keys: the prefix, or in a Redis Cluster the prefix as a hash tag
    /// (`{parley}`), so every presence key lives in one slot and the multi-key pipelines
    /// and `MGET` below stay valid there.
    keys: String,
}

impl Keys {
    pub fn new(prefix: &str, cluster: bool) -> Self {
        Self {
            prefix: prefix.to_string(),
            keys: if cluster {
                format!("{{{prefix}}}")
            } else {
                prefix.to_string()
            },
        }
    }
    /// A key in the presence keys' slot (in a Redis Cluster every presence key is in it).
    pub fn presence_slot_key(&self) -> &str {
        &self.keys
    }
    fn instances(&self) -> String {
        format!("{}:instances", self.keys)
    }
    fn online(&self, user: &str) -> String {
        format!("{}:online:{user}", self.keys)
    }
    fn users(&self, instance: u64) -> String {
        format!("{}:users:{instance:x}", self.keys)
    }
    fn addr(&self, instance: &str) -> String {
        format!("{}:addr:{instance}", self.keys)
    }
    fn seen(&self, user: &str) -> String {
        format!("{}:seen:{user}", self.keys)
    }
    pub fn room_channel(&self, room: &str) -> String {
        format!("{}:room:{room}", self.prefix)
    }
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}:user:{user}", self.prefix)
    }
    pub fn all_channel(&self) -> String {
        format!("{}:all", self.prefix)
    }
    /// The room whose channel `channel` is.
    pub fn room_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.prefix)?.strip_prefix(":room:")
    }
    /// The user whose channel `channel` is.
    pub fn user_of_channel<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.prefix)?.strip_prefix(":user:")
    }
}

/// One instance's view of the presence keys.
pub struct Presence {
    pub keys: Keys,
    pub instance: u64,
    pub ttl: Duration,
    pub last_seen_ttl: Duration,
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

impl Presence {
    /// Refreshes this instance's heartbeat and address (also a liveness probe of the
    /// connection). O(1) commands.
    pub async fn heartbeat(
        &self,
        conn: &mut Conn,
        advertise: Option<&str>,
        now: i64,
    ) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(self.keys.instances())
            .arg(now + ms(self.ttl))
            .arg(self.instance)
            .ignore();
        if let Some(addr) = advertise {
            pipe.cmd("SET")
                .arg(self.keys.addr(&format!("{:x}", self.instance)))
                .arg(addr)
                .arg("PX")
                .arg(ms(self.ttl))
                .ignore();
        }
        // Outlives the instance's entry, so whoever claims a dead instance can read it.
        pipe.cmd("PEXPIRE")
            .arg(self.keys.users(self.instance))
            .arg(10 * ms(self.ttl))
            .ignore();
        pipe.exec_async(conn).await
    }

    /// Writes every local user again (after Redis lost its keys, e.g. a restart).
    pub async fn restore(&self, conn: &mut Conn, users: &[String]) -> redis::RedisResult<()> {
        for chunk in users.chunks(512) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.cmd("SADD")
                    .arg(self.keys.online(user))
                    .arg(self.instance)
                    .ignore();
            }
            pipe.cmd("SADD")
                .arg(self.keys.users(self.instance))
                .arg(chunk)
                .ignore();
            pipe.exec_async(conn).await?;
        }
        Ok(())
    }

    pub async fn online(&self, conn: &mut Conn, user: &str) -> redis::RedisResult<()> {
        redis::pipe()
            .cmd("SADD")
            .arg(self.keys.online(user))
            .arg(self.instance)
            .ignore()
            .cmd("SADD")
            .arg(self.keys.users(self.instance))
            .arg(user)
            .ignore()
            .exec_async(conn)
            .await
    }

    pub async fn offline(&self, conn: &mut Conn, user: &str, at: i64) -> redis::RedisResult<()> {
        redis::pipe()
            .cmd("SREM")
            .arg(self.keys.online(user))
            .arg(self.instance)
            .ignore()
            .cmd("SREM")
            .arg(self.keys.users(self.instance))
            .arg(user)
            .ignore()
            .cmd("SET")
            .arg(self.keys.seen(user))
            .arg(at)
            .arg("PX")
            .arg(ms(self.last_seen_ttl))
            .ignore()
            .exec_async(conn)
            .await
    }

    /// The instances alive now.
    async fn alive(
        &self,
        conn: &mut Conn,
        now: i64,
    ) -> redis::RedisResult<std::collections::HashSet<u64>> {
        let ids: Vec<u64> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.instances())
            .arg(format!("({now}"))
            .arg("+inf")
            .query_async(conn)
            .await?;
        Ok(ids.into_iter().collect())
    }

    pub async fn query(
        &self,
        conn: &mut Conn,
        users: &[String],
        now: i64,
    ) -> redis::RedisResult<Vec<UserPresence>> {
        let alive = self.alive(conn, now).await?;
        let mut pipe = redis::pipe();
        for user in users {
            pipe.cmd("SMEMBERS").arg(self.keys.online(user));
            pipe.cmd("GET").arg(self.keys.seen(user));
        }
        let flat: Vec<redis::Value> = pipe.query_async(conn).await?;
        let mut out = Vec::with_capacity(users.len());
        let mut it = flat.into_iter();
        while let (Some(holders), Some(seen)) = (it.next(), it.next()) {
            let holders: Vec<u64> = redis::from_redis_value(holders)?;
            let seen: Option<i64> = redis::from_redis_value(seen)?;
            let online = holders.iter().any(|i| alive.contains(i));
            out.push(UserPresence {
                online,
                last_seen: if online { 0 } else { seen.unwrap_or(0) },
            });
        }
        Ok(out)
    }

    /// The advertised address of a live instance.
    pub async fn locate(
        &self,
        conn: &mut Conn,
        instance: &str,
    ) -> redis::RedisResult<Option<String>> {
        redis::cmd("GET")
            .arg(self.keys.addr(instance))
            .query_async(conn)
            .await
    }

    /// The advertised addresses of the live instances (id in hex → address), at most
    /// `max`.
    pub async fn addresses(
        &self,
        conn: &mut Conn,
        now: i64,
        max: usize,
    ) -> redis::RedisResult<Vec<(String, String)>> {
        let ids: Vec<u64> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.instances())
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("LIMIT")
            .arg(0)
            .arg(max)
            .query_async(conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = ids.iter().map(|i| format!("{i:x}")).collect();
        let keys: Vec<String> = ids.iter().map(|i| self.keys.addr(i)).collect();
        let addrs: Vec<Option<String>> = redis::cmd("MGET").arg(keys).query_async(conn).await?;
        Ok(ids
            .into_iter()
            .zip(addrs)
            .filter_map(|(id, addr)| Some((id, addr?)))
            .collect())
    }

    /// Whether another live instance has a session of `user`.
    pub async fn online_elsewhere(
        &self,
        conn: &mut Conn,
        user: &str,
        now: i64,
    ) -> redis::RedisResult<bool> {
        let alive = self.alive(conn, now).await?;
        let holders: Vec<u64> = redis::cmd("SMEMBERS")
            .arg(self.keys.online(user))
            .query_async(conn)
            .await?;
        Ok(holders
            .iter()
            .any(|i| *i != self.instance && alive.contains(i)))
    }

    /// Claims the instances whose heartbeat expired and returns their users that have no
    /// session left anywhere, with the dead instance's last heartbeat as last-seen time.
    pub async fn claim_dead(
        &self,
        conn: &mut Conn,
        now: i64,
    ) -> redis::RedisResult<Vec<(String, i64)>> {
        let dead: Vec<(u64, i64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.instances())
            .arg("-inf")
            .arg(now)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(16)
            .query_async(conn)
            .await?;
        let mut out = Vec::new();
        for (instance, expiry) in dead {
            let claimed: i64 = redis::cmd("ZREM")
                .arg(self.keys.instances())
                .arg(instance)
                .query_async(conn)
                .await?;
            if claimed != 1 || instance == self.instance {
                continue;
            }
            let seen = expiry - ms(self.ttl);
            let users_key = self.keys.users(instance);
            let users: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&users_key)
                .query_async(conn)
                .await?;
            let _: () = redis::cmd("DEL").arg(&users_key).query_async(conn).await?;
            if users.is_empty() {
                continue;
            }
            let alive = self.alive(conn, now).await?;
            for user in users {
                let key = self.keys.online(&user);
                let (_, holders): (i64, Vec<u64>) = redis::pipe()
                    .cmd("SREM")
                    .arg(&key)
                    .arg(instance)
                    .cmd("SMEMBERS")
                    .arg(&key)
                    .query_async(conn)
                    .await?;
                if !holders.iter().any(|i| alive.contains(i)) {
                    let _: () = redis::cmd("SET")
                        .arg(self.keys.seen(&user))
                        .arg(seen)
                        .arg("PX")
                        .arg(ms(self.last_seen_ttl))
                        .query_async(conn)
                        .await?;
                    out.push((user, seen));
                }
            }
        }
        Ok(out)
    }
}
