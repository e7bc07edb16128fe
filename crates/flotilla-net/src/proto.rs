//! The messages of the `flotilla.v1.Coordinator` service (see `proto/flotilla.proto`).
//!
//! Tasks and replies travel as the encoded `TaskMsg` / `ReplyMsg` of `flotilla-core`, the
//! very bytes the simulator measures; a protobuf `bytes` field holding an encoded message is
//! wire-identical to an embedded message field, so the schema documents them as messages.

/// Client → server: what run is this? Sent first, before the client sets up its data.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescribeRequest {
    /// `flotilla_core::wire::PROTOCOL_VERSION` of the client.
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
}

/// Server → client: the run's experiment and timing.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DescribeReply {
    /// The experiment (resolved TOML): data partitioning, seed, method.
    #[prost(string, tag = "1")]
    pub experiment_toml: String,
    /// Seconds between heartbeats while the client trains.
    #[prost(double, tag = "2")]
    pub heartbeat_s: f64,
    /// Protocol version of the server.
    #[prost(uint32, tag = "3")]
    pub protocol_version: u32,
}

/// Client → server: join the run (or join again after a restart or a lost connection).
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinRequest {
    /// `flotilla_core::wire::PROTOCOL_VERSION` of the client.
    #[prost(uint32, tag = "1")]
    pub protocol_version: u32,
    /// The client id asked for (the partition index with `--partition K/N`); none: any free id.
    #[prost(uint64, optional, tag = "2")]
    pub client: Option<u64>,
    /// The device profile (`flotilla_core::device::DeviceProfile`) as JSON.
    #[prost(string, tag = "3")]
    pub profile_json: String,
    /// Number of local training examples.
    #[prost(uint64, tag = "4")]
    pub num_examples: u64,
    /// A name for logs (host name, device label).
    #[prost(string, tag = "5")]
    pub name: String,
}

/// Server → client: the client's identity in this run and what it needs to set up.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinReply {
    /// The client id assigned.
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// Session id; every later call carries it, a new join replaces it.
    #[prost(uint64, tag = "2")]
    pub session: u64,
}

/// Client → server: ask for work (long poll).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullRequest {
    /// Client id.
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// Session id from [`JoinReply`].
    #[prost(uint64, tag = "2")]
    pub session: u64,
    /// What the client holds: a task it gets relies on nothing else
    /// (`flotilla_engine::held`).
    #[prost(message, repeated, tag = "3")]
    pub held: Vec<HeldRef>,
}

/// A mask or tensor the client holds, by name and fingerprint.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeldRef {
    /// Mask or tensor name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `Mask::fingerprint` or `wire::fingerprint`.
    #[prost(fixed64, tag = "2")]
    pub fingerprint: u64,
    /// A mask (true) or a tensor (false).
    #[prost(bool, tag = "3")]
    pub mask: bool,
}

impl PullRequest {
    /// The inventory the request declares.
    pub fn inventory(&self) -> flotilla_engine::held::Inventory {
        let mut inv = flotilla_engine::held::Inventory::default();
        for h in &self.held {
            let into = if h.mask {
                &mut inv.masks
            } else {
                &mut inv.tensors
            };
            into.insert(h.name.clone(), h.fingerprint);
        }
        inv
    }
}

/// What a pull returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PullStatus {
    /// Nothing yet; pull again.
    Wait = 0,
    /// `task` holds a task.
    Task = 1,
    /// The run ended normally; exit.
    Done = 2,
    /// The run ended in an error (`reason`); exit with a failure.
    Failed = 3,
}

/// Server → client: a task, or wait, or done.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullReply {
    /// What this is.
    #[prost(enumeration = "PullStatus", tag = "1")]
    pub status: i32,
    /// An encoded `flotilla_core::wire::TaskMsg` when `status` is `Task`.
    #[prost(bytes = "vec", tag = "2")]
    pub task: Vec<u8>,
    /// Why the run ended, when `status` is `Failed`.
    #[prost(string, tag = "3")]
    pub reason: String,
}

/// Client → server: the reply to a task.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    /// Client id.
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// Session id.
    #[prost(uint64, tag = "2")]
    pub session: u64,
    /// An encoded `flotilla_core::wire::ReplyMsg`.
    #[prost(bytes = "vec", tag = "3")]
    pub reply: Vec<u8>,
}

/// Server → client: whether the update counts.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushReply {
    /// Accepted for aggregation.
    #[prost(bool, tag = "1")]
    pub accepted: bool,
    /// Why not, when refused.
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// Client → server: still alive (sent while training).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeartbeatRequest {
    /// Client id.
    #[prost(uint64, tag = "1")]
    pub client: u64,
    /// Session id.
    #[prost(uint64, tag = "2")]
    pub session: u64,
}

/// Server → client: acknowledgement.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeartbeatReply {}

/// Generated service stubs.
#[allow(missing_docs, clippy::all)]
pub mod service {
    include!(concat!(env!("OUT_DIR"), "/flotilla.v1.Coordinator.rs"));
}
