//! Presence across instances, in Redis keys (all under the configured prefix):
//!
//! - `instances` — sorted set: instance id → expiry (Unix ms), refreshed every
//!   `presence_heartbeat`, valid for `presence_ttl`;
//! - `online:{user}` — sorted set: instance id → expiry, one member per instance with a
//!   session of the user; the user is online while any member's expiry is in the future;
//! - `users:{instance}` — set of the users an instance has sessions for (so that the
//!   instances still alive can tell co-members when it dies);
//! - `seen:{user}` — last-seen time (Unix ms), expiring after `last_seen_ttl`.
//!
//! A clean `offline` removes the instance from `online:{user}` at once. An instance that
//! dies (kill -9, lost machine) stops refreshing: its users read as offline as soon as
//! their expiry passes (at most `presence_ttl` after its last heartbeat), and the first
//! live instance whose heartbeat notices the dead one claims it (`ZREM` returns 1 to one
//! instance only) and reports its users that are offline everywhere so chat can push
//! presence. Expiries are compared with each instance's clock: keep clocks in sync (NTP);
//! skew shifts the bound by the same amount.
//!
//! Owns: the presence keys. Not: presence pushes (`chat`).

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::UserPresence;

/// Key names of one deployment.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }
    fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }
    fn online(&self, user: &str) -> String {
        format!("{}:online:{user}", self.prefix)
    }
    fn users(&self, instance: u64) -> String {
        format!("{}:users:{instance:x}", self.prefix)
    }
    fn addr(&self, instance: &str) -> String {
        format!("{}:addr:{instance}", self.prefix)
    }
    fn seen(&self, user: &str) -> String {
        format!("{}:seen:{user}", self.prefix)
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
    /// Refreshes this instance's heartbeat and its users' entries (also a liveness probe
    /// of the connection).
    pub async fn heartbeat(
        &self,
        conn: &mut ConnectionManager,
        users: &[String],
        advertise: Option<&str>,
        now: i64,
    ) -> redis::RedisResult<()> {
        let expiry = now + ms(self.ttl);
        let mut pipe = redis::pipe();
        if let Some(addr) = advertise {
            pipe.cmd("SET")
                .arg(self.keys.addr(&format!("{:x}", self.instance)))
                .arg(addr)
                .arg("PX")
                .arg(ms(self.ttl))
                .ignore();
        }
        pipe.cmd("ZADD")
            .arg(self.keys.instances())
            .arg(expiry)
            .arg(self.instance)
            .ignore();
        let users_key = self.keys.users(self.instance);
        for chunk in users.chunks(512) {
            for user in chunk {
                let key = self.keys.online(user);
                pipe.cmd("ZADD")
                    .arg(&key)
                    .arg(expiry)
                    .arg(self.instance)
                    .ignore();
                pipe.cmd("PEXPIRE").arg(&key).arg(2 * ms(self.ttl)).ignore();
            }
            pipe.cmd("SADD").arg(&users_key).arg(chunk).ignore();
        }
        // Outlives the instance's entry, so whoever claims a dead instance can read it.
        pipe.cmd("PEXPIRE")
            .arg(&users_key)
            .arg(10 * ms(self.ttl))
            .ignore();
        pipe.exec_async(conn).await
    }

    pub async fn online(
        &self,
        conn: &mut ConnectionManager,
        user: &str,
        now: i64,
    ) -> redis::RedisResult<()> {
        let key = self.keys.online(user);
        redis::pipe()
            .cmd("ZADD")
            .arg(&key)
            .arg(now + ms(self.ttl))
            .arg(self.instance)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(2 * ms(self.ttl))
            .ignore()
            .cmd("SADD")
            .arg(self.keys.users(self.instance))
            .arg(user)
            .ignore()
            .exec_async(conn)
            .await
    }

    pub async fn offline(
        &self,
        conn: &mut ConnectionManager,
        user: &str,
        at: i64,
    ) -> redis::RedisResult<()> {
        redis::pipe()
            .cmd("ZREM")
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

    pub async fn query(
        &self,
        conn: &mut ConnectionManager,
        users: &[String],
        now: i64,
    ) -> redis::RedisResult<Vec<UserPresence>> {
        let mut pipe = redis::pipe();
        for user in users {
            pipe.cmd("ZCOUNT")
                .arg(self.keys.online(user))
                .arg(format!("({now}"))
                .arg("+inf");
            pipe.cmd("GET").arg(self.keys.seen(user));
        }
        let answers: Vec<(i64, Option<i64>)> = {
            let flat: Vec<redis::Value> = pipe.query_async(conn).await?;
            let mut out = Vec::with_capacity(users.len());
            let mut it = flat.into_iter();
            while let (Some(count), Some(seen)) = (it.next(), it.next()) {
                let count: i64 = redis::from_redis_value(count)?;
                let seen: Option<i64> = redis::from_redis_value(seen)?;
                out.push((count, seen));
            }
            out
        };
        Ok(answers
            .into_iter()
            .map(|(count, seen)| {
                let online = count > 0;
                UserPresence {
                    online,
                    last_seen: if online { 0 } else { seen.unwrap_or(0) },
                }
            })
            .collect())
    }

    /// The advertised address of a live instance.
    pub async fn locate(
        &self,
        conn: &mut ConnectionManager,
        instance: &str,
    ) -> redis::RedisResult<Option<String>> {
        redis::cmd("GET")
            .arg(self.keys.addr(instance))
            .query_async(conn)
            .await
    }

    /// Whether another instance holds a live entry for `user`.
    pub async fn online_elsewhere(
        &self,
        conn: &mut ConnectionManager,
        user: &str,
        now: i64,
    ) -> redis::RedisResult<bool> {
        let holders: Vec<u64> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.online(user))
            .arg(format!("({now}"))
            .arg("+inf")
            .query_async(conn)
            .await?;
        Ok(holders.iter().any(|i| *i != self.instance))
    }

    /// Claims the instances whose heartbeat expired and returns their users that have no
    /// session left anywhere, with the dead instance's last heartbeat as last-seen time.
    pub async fn claim_dead(
        &self,
        conn: &mut ConnectionManager,
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
            for user in users {
                let key = self.keys.online(&user);
                let (_, left): (i64, i64) = redis::pipe()
                    .cmd("ZREM")
                    .arg(&key)
                    .arg(instance)
                    .cmd("ZCOUNT")
                    .arg(&key)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query_async(conn)
                    .await?;
                if left == 0 {
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
